"""Training throughput of the DiT: train/tokens_per_s and train/mfu.

Tokens and FLOPs are analytic (dit.flops_per_step) from the shape of the last training step, so they cost no
profiling; the time is the wall time between consecutive batch ends, so it includes data loading. MFU needs the
device's peak FLOP/s: given, or looked up from the device name (none on a CPU, where train/mfu is not logged).
"""

from __future__ import annotations

import logging
import time

from cogvx_train.dit.flops import flops_per_step
from cogvx_train.dit.transformer import DiTConfig

log = logging.getLogger(__name__)


class StepThroughput:
    """Tokens and FLOPs of the last training step on this rank, and their rate between batch ends."""

    def __init__(self, config: DiTConfig, peak_flops: float | None = None):
        self.config = config
        self.step_shape: tuple[int, int, int, int, int] | None = None  # (B, T', h, w, L) of the last step
        self.last_batch_end: float | None = None
        self._peak = peak_flops
        self._warned_no_peak = False

    def tokens(self) -> int:
        """Text + vision tokens of the last step."""
        if self.step_shape is None:
            return 0
        b, t, h, w, length = self.step_shape
        p = self.config.patch_size
        return b * (length + t * (h // p) * (w // p))

    def flops(self) -> tuple[int, int]:
        """(model, hardware) FLOPs of the last step (MFU / HFU numerators)."""
        if self.step_shape is None:
            return 0, 0
        b, t, h, w, length = self.step_shape
        return (flops_per_step(self.config, b, t, h, w, text_tokens=length, mode="model"),
                flops_per_step(self.config, b, t, h, w, text_tokens=length, mode="hardware"))

    def peak_flops(self) -> float | None:
        if self._peak is None:
            from cogvx_train.train.callbacks import peak_flops_per_device

            self._peak = peak_flops_per_device() or 0.0
            if not self._peak and not self._warned_no_peak:
                self._warned_no_peak = True
                log.info("no known peak FLOP/s for this device (CPU or unlisted GPU): train/mfu is not logged; pass "
                         "peak_flops= to log it.")
        return self._peak or None

    def batch_end(self, world: int) -> dict[str, float]:
        """At the end of a training batch: train/tokens_per_s (all `world` ranks) and train/mfu since the previous
        batch end; nothing at the first batch end (of a fit) or before any step."""
        now = time.perf_counter()
        last, self.last_batch_end = self.last_batch_end, now
        if last is None or self.step_shape is None:
            return {}
        dt = max(now - last, 1e-9)
        metrics = {"train/tokens_per_s": self.tokens() * world / dt}
        peak = self.peak_flops()
        if peak:
            metrics["train/mfu"] = self.flops()[0] / dt / peak
        return metrics

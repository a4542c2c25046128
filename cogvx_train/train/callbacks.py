"""Callbacks every run gets: per-rank RNG in checkpoints, throughput/MFU, non-finite step guard."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

log = logging.getLogger("cogvx_train")


# ----------------------------------------------------------------------------------------------------------------
# Per-rank RNG state
# ----------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(Callback):
    """Saves every rank's RNG state in the checkpoint and restores each rank's own on resume.

    Lightning writes the checkpoint from rank 0 only, so the states are all-gathered first. On resume at a
    different world size, ranks beyond the saved ones are reseeded from (seed, rank) — exactness across a
    world-size change is not possible anyway, because the global batch is split differently.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._gathered: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": self._gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("per_rank")

    def _gather(self, trainer) -> list[dict[str, Any]]:
        mine = rng_state()
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [mine]
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, mine)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Gather only when a checkpoint may be written after this batch (cheap check, collective on all ranks).
        every = getattr(trainer, "_cogvx_ckpt_every", None)
        if every is None:
            every = min([cb._every_n_train_steps for cb in trainer.checkpoint_callbacks
                         if getattr(cb, "_every_n_train_steps", 0)] or [0])
            trainer._cogvx_ckpt_every = every
        step = trainer.global_step
        if every and step % every == 0 or trainer.should_stop or step >= (trainer.max_steps or math.inf):
            self._gathered = self._gather(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending:
            rank = trainer.global_rank
            if rank < len(self._pending):
                set_rng_state(self._pending[rank])
                log.info("restored RNG state of rank %d", rank)
            self._pending = None


# ----------------------------------------------------------------------------------------------------------------
# Throughput, MFU/HFU and the share of step time spent waiting for data
# ----------------------------------------------------------------------------------------------------------------
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_flops_per_device() -> float | None:
    """bf16 dense peak of this device, None where unknown (CPU): MFU is then not logged."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class ThroughputMonitor(Callback):
    """Logs perf/step_time_s, perf/data_wait_share, perf/tokens_per_s, perf/mfu and perf/hfu every step.

    Data wait = time from the end of one training batch to the start of the next: the loader's share of the
    step. Tokens and FLOPs come from the module (`tokens_in_batch(batch)`, `flops_in_batch(batch)` returning
    (model_flops, hardware_flops)) when it defines them.
    """

    def __init__(self) -> None:
        self._batch_end: float | None = None
        self._batch_start = 0.0
        self._wait = 0.0
        self.peak = peak_flops_per_device()
        self.totals = {"wait": 0.0, "step": 0.0, "steps": 0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._wait = now - self._batch_end if self._batch_end is not None else 0.0
        self._batch_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        compute = now - self._batch_start
        step = compute + self._wait
        self._batch_end = now
        if self._wait > 0:  # the first batch has no previous end to measure from
            self.totals["wait"] += self._wait
            self.totals["step"] += step
            self.totals["steps"] += 1
        metrics = {"perf/step_time_s": step, "perf/data_wait_share": self._wait / step if step > 0 else 0.0}
        world = trainer.world_size
        if hasattr(pl_module, "tokens_in_batch"):
            metrics["perf/tokens_per_s"] = pl_module.tokens_in_batch(batch) * world / step
        if hasattr(pl_module, "flops_in_batch") and self.peak:
            model_flops, hardware_flops = pl_module.flops_in_batch(batch)
            metrics["perf/mfu"] = model_flops / step / self.peak
            metrics["perf/hfu"] = hardware_flops / step / self.peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True, rank_zero_only=True)

    def data_wait_share(self) -> float:
        return self.totals["wait"] / self.totals["step"] if self.totals["step"] else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss or gradients
# ----------------------------------------------------------------------------------------------------------------
def grads_finite(parameters) -> bool:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class NonFiniteGuard(Callback):
    """Skips optimizer steps whose gradients are not finite (a NaN/inf loss gives such gradients), counts them,
    and after `max_consecutive` in a row rolls model and optimizer back to the last good checkpoint.

    Skipping = dropping the gradients: AdamW leaves parameters without .grad untouched (no decay, no moments).
    Gradients are checked after DDP's all-reduce, so every rank takes the same decision.
    """

    def __init__(self, max_consecutive: int = 5, checkpoint_dir: str | None = None) -> None:
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.consecutive = 0
        self.total_skipped = 0
        self.rollbacks = 0

    def state_dict(self) -> dict[str, int]:
        return {"total_skipped": self.total_skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.total_skipped = state_dict.get("total_skipped", 0)
        self.rollbacks = state_dict.get("rollbacks", 0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if grads_finite(params):
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self.consecutive += 1
        self.total_skipped += 1
        log.warning("non-finite loss or gradients at step %d: step skipped (%d in a row, %d in total)",
                    trainer.global_step, self.consecutive, self.total_skipped)
        pl_module.log("train/skipped_nonfinite_steps", float(self.total_skipped), on_step=True, logger=True,
                      rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            self.roll_back(trainer, pl_module)

    def roll_back(self, trainer, pl_module) -> None:
        last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
        if last is None or not last.exists():
            raise RuntimeError(f"{self.consecutive} non-finite steps in a row and no checkpoint to roll back to; "
                               "lower optim.lr or check the data (see the warnings above for the steps).")
        log.warning("%d non-finite steps in a row: rolling model, EMA and optimizer back to %s",
                    self.consecutive, last)
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        trainer.strategy.load_model_state_dict(ckpt, strict=False)
        trainer.strategy.load_optimizer_state_dict(ckpt)
        if hasattr(pl_module, "on_load_checkpoint"):
            pl_module.on_load_checkpoint(ckpt)
        self.consecutive = 0
        self.rollbacks += 1

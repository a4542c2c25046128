"""The training loss per timestep bucket (train/loss_tAAA-BBB, train/t_count_tAAA-BBB) over recent steps.

The v-loss differs by orders of magnitude across timesteps, so train/loss alone cannot say which part of the noise
range is (not) learning. [0, num_train_timesteps) is cut into equal buckets, and each bucket's mean loss and sample
count are taken over a window of recent steps (the module keeps log_every_n_steps of them, gathered from all ranks),
without a host sync: an empty bucket reads NaN.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor


class TimestepBuckets:
    """Bucket names and statistics over a window of the (timesteps [N], per-sample loss [N]) of recent steps."""

    def __init__(self, num_train_timesteps: int, num_buckets: int):
        n, k = num_train_timesteps, num_buckets
        if not 1 <= k <= n:
            raise ValueError(f"diffusion.loss_buckets={k} must be in [1, {n}].")
        self.bounds = [(i * n) // k for i in range(k + 1)]  # bucket i: bounds[i] <= t < bounds[i + 1]
        self.names = [f"t{self.bounds[i]:03d}-{self.bounds[i + 1] - 1:03d}" for i in range(k)]
        self.window: collections.deque[tuple[Tensor, Tensor]] = collections.deque(maxlen=10)

    def add(self, t: Tensor, loss: Tensor, steps: int) -> tuple[dict[str, Tensor], Tensor]:
        """Append one step's timesteps and per-sample losses to a window of the last `steps` steps; return the
        metrics {train/loss_<name>, train/t_count_<name>} over the window, and all the window's timesteps."""
        if self.window.maxlen != steps:
            self.window = collections.deque(self.window, maxlen=steps)
        self.window.append((t, loss.float()))
        ts = torch.cat([w[0] for w in self.window])
        losses = torch.cat([w[1] for w in self.window])
        k = len(self.names)
        inner = torch.tensor(self.bounds[1:-1], device=ts.device)
        bucket = torch.bucketize(ts, inner, right=True)  # bounds[i] <= t < bounds[i + 1] -> i
        counts = torch.bincount(bucket, minlength=k).float()
        sums = torch.zeros(k, device=losses.device).scatter_add_(0, bucket, losses)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        metrics = {}
        for i, name in enumerate(self.names):
            metrics[f"train/loss_{name}"] = means[i]
            metrics[f"train/t_count_{name}"] = counts[i]
        return metrics, ts

    def state(self) -> list[tuple[Tensor, Tensor]]:
        """The window on the CPU, for a checkpoint: a resumed run logs what the uninterrupted one does."""
        return [(t.cpu(), loss.cpu()) for t, loss in self.window]

    def load_state(self, window: list[tuple[Tensor, Tensor]], device: torch.device) -> None:
        """Restore a window from state(); the next add() resizes it to the run's log_every_n_steps."""
        self.window = collections.deque((t.to(device), loss.to(device)) for t, loss in window)

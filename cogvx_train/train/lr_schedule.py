"""Learning-rate multipliers: linear warmup, then cosine, linear or constant, shared by the VAE and DiT modules.

The multiplier is a picklable object (not a closure) so that ``torch.optim.lr_scheduler.LambdaLR`` stores it in its
state dict and a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "constant", "linear")


@dataclass(frozen=True)
class LRLambda:
    """lr(step) / base_lr. ``step`` counts optimizer steps from 0."""

    warmup_steps: int
    total_steps: int | None
    schedule: str
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1) so that the very first update already moves the weights
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        assert self.total_steps is not None  # checked in build_lr_lambda
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # linear
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_lr_lambda(warmup_steps: int, total_steps: int | None, schedule: str = "cosine",
                    min_lr_ratio: float = 0.0) -> LRLambda:
    """Multiplier for ``LambdaLR``: warms up linearly over ``warmup_steps`` and then follows ``schedule`` from 1 down
    to ``min_lr_ratio`` at ``total_steps`` (held there afterwards). ``total_steps`` may be None only for "constant".
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must lie in [0, 1], e.g. 0.1.")
    if schedule != "constant":
        if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
            raise ValueError(f"the {schedule} lr schedule needs a finite total number of steps (got {total_steps!r}); "
                             "set trainer.max_steps or use optim.schedule=constant.")
        total_steps = int(total_steps)
        if warmup_steps > total_steps:
            raise ValueError(f"optim.warmup_steps={warmup_steps} is longer than the run (trainer.max_steps="
                             f"{total_steps}); use at most {total_steps} warmup steps or a longer run.")
    return LRLambda(warmup_steps=warmup_steps, total_steps=None if total_steps is None else int(total_steps),
                    schedule=schedule, min_lr_ratio=float(min_lr_ratio))

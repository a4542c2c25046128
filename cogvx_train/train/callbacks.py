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

from cogvx_train.train.ema import EMA

log = logging.getLogger("cogvx_train")


# ----------------------------------------------------------------------------------------------------------------
# Per-rank RNG state
# ----------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global generator's state in types `torch.load(weights_only=True)` accepts (Lightning's default when it
    resumes): numpy's key array travels as a tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(Callback):
    """Saves every rank's RNG state in the checkpoint and restores each rank's own on resume.

    Exactness needs the training steps to see one unbroken random stream, so the state is taken at the end of
    every training batch and put back at the start of the next one: whatever runs in between (validation, a
    checkpoint write, creating the DataLoader iterator, which draws a worker seed from the global generator) never
    shifts what the next step draws, in an uninterrupted run and in a resumed one alike. A checkpoint stores the
    states taken at the end of the last batch (all-gathered, since Lightning writes the file from rank 0 only, but
    every rank builds the checkpoint dict); on resume they are put back at the start of the first batch, after
    the new DataLoader iterator exists. Ranks beyond the saved ones (resume at a larger world size) keep their
    (seed, rank) seeding: exactness across a world-size change is not possible anyway.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._after_batch: dict[str, Any] | None = None
        self._trainer_ref = None  # state_dict() gets no trainer argument; set in setup()

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": self._gather(self._trainer_ref) if self._after_batch is not None else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("per_rank") or None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer_ref = trainer

    def _gather(self, trainer) -> list[dict[str, Any]]:
        mine = self._after_batch
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [mine]
        out: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(out, mine)
        return out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:  # the first batch after a resume
            rank = trainer.global_rank
            if rank < len(self._pending) and self._pending[rank] is not None:
                set_rng_state(self._pending[rank])
                log.info("restored RNG state of rank %d", rank)
            self._pending = None
        elif self._after_batch is not None:
            set_rng_state(self._after_batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._after_batch = rng_state()


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

    Data wait = time from the end of one training batch to the start of the next, less any validation run in
    between: the loader's share of the step (checkpoint writes at the steps that save one are included). Tokens and
    FLOPs come from the module (`tokens_in_batch(batch)`, `flops_in_batch(batch)` returning (model_flops,
    hardware_flops)) when it defines them.
    """

    def __init__(self) -> None:
        self._batch_end: float | None = None
        self._batch_start = 0.0
        self._wait = 0.0
        self._val_start = 0.0
        self.peak = peak_flops_per_device()
        self.totals = {"wait": 0.0, "step": 0.0, "steps": 0}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._wait = now - self._batch_end if self._batch_end is not None else 0.0
        self._batch_start = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._batch_end is not None:  # validation is not data wait: move the last batch end past it
            self._batch_end += time.perf_counter() - self._val_start

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


def _on_every_rank(finite: bool) -> bool:
    """`finite` and'ed over all ranks. Under DDP every rank holds the same all-reduced gradients and so the same
    verdict; under FSDP each rank checks only its own gradient shard, and the ranks must still skip (and roll back,
    a collective load) together."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return finite
    flag = torch.tensor([int(finite)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def deepspeed_engine(trainer):
    """The DeepSpeed engine training this run, or None under any other strategy."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    return engine if hasattr(engine, "skipped_steps") else None


def emas_of(pl_module) -> list[EMA]:
    """The module's EMAs (attributes holding an EMA: `ema` in both training modules)."""
    return [value for value in vars(pl_module).values() if isinstance(value, EMA)]


class NonFiniteGuard(Callback):
    """Skips optimizer steps whose gradients are not finite (a NaN/inf loss gives such gradients), counts them,
    and after `max_consecutive` bad training steps in a row rolls weights, EMA and optimizer moments back to the
    last good checkpoint.

    Skipping = dropping the gradients: AdamW leaves parameters without .grad untouched (no decay, no moments), and
    the EMA of those weights is told to leave its shadow alone at its next update (`EMA.skip_next_update`; an EMA
    belongs to the optimizer that holds its parameters, so the VAE's EMA follows the generator's verdict, not the
    discriminator's). Gradients are checked after DDP's all-reduce, so every rank takes the same decision. The check
    runs in `on_before_optimizer_step`, which Lightning calls from inside `optimizer.step()` under automatic and
    manual optimisation alike, so the VAE's generator and discriminator updates are each checked. A training step
    counts as skipped when any of its optimizer updates was; `train/skipped_nonfinite_steps` (the running total) is
    logged every step. Step counters, lr schedules and the data position go on through a roll-back, so the batches
    that gave the non-finite values are not replayed.

    DeepSpeed ZeRO keeps the reduced gradients in its own flat partitions, one slice per rank, where no callback
    can drop them. There the engine decides: under ZeRO-1/2 `CogvxDeepSpeedStrategy` turns on its overflow
    check, which tests every rank's slice and all-reduces the verdict inside `engine.step()`; ZeRO-3's optimizer
    skips on a non-finite all-reduced grad norm by itself. Either way the update is skipped on all ranks
    together. The guard reads that verdict (`engine.skipped_steps` went up), counts it and, through the same
    deferred `skip_next_update`, keeps the EMA out of it.

    `inject_nan_steps` (config key `debug_inject_nan_steps`) is a test hook: the floating-point tensors of the
    batches at those global steps are filled with NaN before the step runs, so the whole path (NaN loss, NaN
    gradients, skip, count, roll-back) can be exercised on a real run.
    """

    def __init__(self, max_consecutive: int = 5, checkpoint_dir: str | None = None,
                 inject_nan_steps: list[int] | tuple[int, ...] = ()) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive} must be >= 1 (the bad steps in a row that trigger a "
                             "roll-back).")
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.inject_nan_steps = {int(s) for s in inject_nan_steps}
        self.consecutive = 0
        self.total_skipped = 0
        self.rollbacks = 0
        self._stepped = False  # an optimizer step ran since the last batch end (False while accumulating)
        self._bad = False      # ... and one of its updates had non-finite gradients
        self._engine_skips: tuple[Any, int] | None = None  # (DeepSpeed engine, its skipped_steps before the step)

    def state_dict(self) -> dict[str, int]:
        return {"total_skipped": self.total_skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.total_skipped = state_dict.get("total_skipped", 0)
        self.rollbacks = state_dict.get("rollbacks", 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.inject_nan_steps:
            log.warning("debug_inject_nan_steps: filling the batch of step %d with NaN", trainer.global_step)
            _fill_floats_with_nan(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True
        engine = deepspeed_engine(trainer)
        if engine is not None:  # the engine checks its partitions in step(); its verdict is read afterwards
            before = engine.skipped_steps
            self._engine_skips = (engine, before)
            for ema in emas_of(pl_module):
                ema.skip_next_update(lambda: engine.skipped_steps > before)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if _on_every_rank(grads_finite(params)):
            return
        for p in params:
            p.grad = None
        self._bad = True
        emas = emas_of(pl_module)
        stepped = [ema for ema in emas if ema.tracks(params)]
        if not stepped and len(trainer.optimizers) == 1:  # a wrapper's flat copies (FSDP): the only optimizer
            stepped = emas
        for ema in stepped:
            ema.skip_next_update()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._engine_skips is not None:
            engine, before = self._engine_skips
            self._bad = self._bad or engine.skipped_steps > before
            self._engine_skips = None
        if not self._stepped:
            return
        step = trainer.global_step - 1  # the step this batch ran as
        if self._bad:
            self.consecutive += 1
            self.total_skipped += 1
            log.warning("non-finite loss or gradients at step %d: step skipped (%d in a row, %d in total)",
                        step, self.consecutive, self.total_skipped)
        else:
            self.consecutive = 0
        self._stepped = self._bad = False
        pl_module.log("train/skipped_nonfinite_steps", float(self.total_skipped), on_step=True, on_epoch=False,
                      logger=True, rank_zero_only=True, batch_size=1)
        if self.consecutive >= self.max_consecutive:
            self.roll_back(trainer, pl_module)

    def roll_back(self, trainer, pl_module) -> None:
        """Every rank reloads the last checkpoint through the strategy (a file under DDP, the engine's sharded
        directory under DeepSpeed); the verdicts that lead here are the same on every rank, so all of them do."""
        last = self.checkpoint_dir / "last.ckpt" if self.checkpoint_dir else None
        if last is None or not last.exists():
            raise RuntimeError(f"{self.consecutive} non-finite steps in a row and no checkpoint to roll back to; "
                               "lower optim.lr or check the data (see the warnings above for the steps).")
        ckpt = trainer.strategy.load_checkpoint(last, weights_only=False)
        trainer.strategy.load_model_state_dict(ckpt, strict=False)  # DeepSpeed: loaded by the engine already
        trainer.strategy.load_optimizer_state_dict(ckpt)
        if hasattr(pl_module, "on_load_checkpoint"):
            pl_module.on_load_checkpoint(ckpt)
        log.warning("%d non-finite steps in a row: rolled model, EMA and optimizer back to %s (saved at step %s); "
                    "training goes on from step %d", self.consecutive, last, ckpt.get("global_step"),
                    trainer.global_step)
        self.consecutive = 0
        self.rollbacks += 1


def _fill_floats_with_nan(batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            batch.fill_(float("nan"))
    elif isinstance(batch, dict):
        for value in batch.values():
            _fill_floats_with_nan(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _fill_floats_with_nan(value)

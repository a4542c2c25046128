"""`trainer=deepspeed_zero1/2/3`: Lightning's DeepSpeedStrategy subclassed as `CogvxDeepSpeedStrategy`, for three
reasons:

* CPU runs. Lightning's DeepSpeedStrategy refuses any accelerator but CUDA and checks CUDA device indices, while
  DeepSpeed itself runs on the CPU (its CPU accelerator, gloo). On a CPU accelerator the subclass lifts only those
  two checks, so the real engine (ZeRO partitioning, its optimizer wrapper, its checkpoints) is exercised in CPU
  tests and CI. Precision there is fp32 ("32-true").
* Checkpoints that survive a kill. The engine writes a directory of shards (one optimizer file per rank) with
  plain torch.save. The subclass has every rank write into `<name>.tmp`, fsync, meet at a barrier, and only then
  rank 0 swaps the finished directory into place, so a crash mid-save leaves the previous checkpoint intact.
* Resume at another world size. The engine refuses to load ZeRO optimizer shards written by a different number of
  ranks. When the saved world size differs (or the checkpoint is a single consolidated file), the subclass reads
  the full fp32 weights, Adam moments and step with `cogvx_train.train.consolidate` (no engine involved) and
  scatters them into the new engine's partitions; everything else (loops, data position, EMA, schedulers,
  callbacks) comes back through Lightning as usual. Same world size: the engine's own loader, bit for bit.

Non-finite gradients. ZeRO holds the reduced gradients in per-rank flat partitions that no callback can reach, so
`NonFiniteGuard` cannot drop them as it does under DDP. The engine can: its ZeRO-1/2 optimizer checks every slice
for inf/NaN and all-reduces the verdict inside `step()`, skipping the update on every rank together. It does so by
default only under fp16/bf16; the subclass turns it on at every precision (`enable_overflow_check`), and the guard
reads the verdict from `engine.skipped_steps`.

ZeRO-3 partitions the parameters themselves: a parameter keeps its object, but the values live flattened in
`p.ds_tensor`, one equal slice per rank (see `partition_size`); `p.data` is only a gathered copy while a forward
needs it (always, for the small "persistent" ones). Its optimizer has no overflow switch and needs none: `step()`
all-reduces the global gradient norm, and a non-finite norm (NaN/inf in any rank's gradients) skips the update on
every rank and counts it in `engine.skipped_steps`, at fp32 too (tests/scale/test_deepspeed_nonfinite.py). The
helpers at the end of this file read and rewrite those slices for the EMA (`cogvx_train.train.ema`) and the export.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from cogvx_train.train.consolidate import merge_slices, partition_size
from cogvx_train.train.strategies import on_cpu, recover_checkpoint_dir, save_directory_atomically

log = logging.getLogger("cogvx_train")


def _use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks CUDA whenever torch sees a GPU; a CPU run must use its CPU accelerator (and gloo)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


class CogvxDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy plus CPU runs, atomic sharded saves and resume at another world size (see the
    module docstring). On CUDA it behaves like the parent except for the last two."""

    strategy_name = "cogvx_deepspeed"

    def __init__(self, *args: Any, gradient_clip_val: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # set before Lightning formats the config, so its "trainer.gradient_clip_val or 0" default does not apply
        self.config["gradient_clipping"] = float(gradient_clip_val)
        if kwargs.get("offload_optimizer"):
            # ZeRO-Offload steps the module's own torch AdamW on the host: correct, slower than DeepSpeedCPUAdam
            # (a compiled op the module would have to construct), which DeepSpeed otherwise insists on
            self.config["zero_force_ds_cpu_optimizer"] = False

    # ------------------------------------------------------------------------------------------ CPU runs
    def setup_environment(self) -> None:
        if not on_cpu(self):
            return super().setup_environment()
        _use_deepspeed_cpu_accelerator()
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses anything but CUDA

    def setup_distributed(self) -> None:
        if not on_cpu(self):
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        # the parent also checks that CUDA device indices equal local ranks; CPU devices have no index
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not on_cpu(self):
            engine, ds_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        else:
            engine, ds_optimizer = self._setup_on_cpu(model, optimizer, lr_scheduler)
        enable_overflow_check(ds_optimizer)
        return engine, ds_optimizer

    def _setup_on_cpu(self, model, optimizer, lr_scheduler=None):
        import argparse

        import deepspeed

        # the parent passes the CUDA device index, which a CPU device does not have (the engine needs a rank >= 0)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    def _auto_select_batch_size(self) -> int:
        """Only DeepSpeed's throughput log uses this; bucket samplers have one batch size per bucket, not one."""
        loader = self.lightning_module.trainer.fit_loop._data_source
        if loader.is_defined():
            size = getattr(getattr(loader.dataloader(), "batch_sampler", None), "batch_size", None)
            if isinstance(size, int) and size > 0:
                return size
        return 1

    def init_deepspeed(self) -> None:
        with warnings.catch_warnings():
            # our modules clip in configure_gradient_clipping for DDP/FSDP; here the engine clips (see __init__)
            warnings.filterwarnings("ignore", message=".*DeepSpeed handles gradient clipping internally.*")
            super().init_deepspeed()

    # ------------------------------------------------------------------------------------- atomic saves
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into `<filepath>.tmp`; after all have written and fsynced, rank 0 swaps the
        directory in. A kill at any moment leaves the previous checkpoint loadable."""
        save_directory_atomically(self, filepath, lambda tmp: super(CogvxDeepSpeedStrategy, self).save_checkpoint(
            checkpoint, tmp, storage_options))

    # ----------------------------------------------------------------------------------------- resume
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from cogvx_train.train import consolidate

        path = recover_checkpoint_dir(Path(checkpoint_path)) if self.is_global_zero else Path(checkpoint_path)
        self.barrier("cogvx_ds_load_recover")
        if path.is_dir():
            saved = consolidate.deepspeed_world_size(path)
            if saved == self.world_size and not (self.load_full_weights and self.zero_stage_3):
                return super().load_checkpoint(path, weights_only)
            log.warning("%s was written by %d ranks and this run has %d: loading the consolidated fp32 weights, "
                        "Adam moments and step into the new partitions (DeepSpeed cannot re-partition itself)",
                        path, saved, self.world_size)
        if self.zero_stage_3:
            raise RuntimeError(f"{path}: a ZeRO-3 run resumes only at the world size that wrote it; to change it, "
                               "convert the checkpoint (python -m cogvx_train.cli.convert <ckpt> --out w.ckpt) and "
                               "start a new run with init_from=w.ckpt (weights and EMA; optimizer restarts).")
        full = consolidate.load_full_training_state(path)
        load_full_state_into_engine(self.deepspeed_engine, self.lightning_module, full)
        return full.client_state


def enable_overflow_check(zero_optimizer) -> None:
    """Make the ZeRO-1/2 optimizer test its gradient partitions for inf/NaN at every precision (DeepSpeed does so
    by default only under fp16/bf16) and skip the step on all ranks when any rank finds one. ZeRO-3's optimizer has
    no such switch and needs none: it always takes the all-reduced global grad norm and skips when it is not
    finite (at fp32 on the CPU too: tests/scale/test_deepspeed_nonfinite.py)."""
    if hasattr(zero_optimizer, "check_grad_overflow"):
        zero_optimizer.check_grad_overflow = True
    else:
        log.info("%s has no overflow switch: non-finite steps are skipped by its grad-norm check",
                 type(zero_optimizer).__name__)


def load_full_state_into_engine(engine, module: torch.nn.Module, full) -> None:
    """Scatter a consolidated training state into a ZeRO-1/2 engine of any world size.

    Weights go into the module (every rank holds them whole under ZeRO-1/2) and into this rank's fp32 master
    fragments; Adam's moments and step into this rank's slices of the base optimizer's flat state (created here,
    since torch's AdamW creates it lazily at the first step); learning rates into the param groups, which the
    restored LR scheduler then continues from.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(full.weights))
    if missing:
        raise RuntimeError(f"the checkpoint lacks {len(missing)} parameters of this model (e.g. {missing[:3]}); "
                           "resume with the same model config.")
    with torch.no_grad():
        for name, p in own.items():
            value = full.weights[name]
            if value.shape != p.shape:
                raise RuntimeError(f"checkpoint parameter {name} has shape {tuple(value.shape)}, the model "
                                   f"{tuple(p.shape)}; resume with the same model config.")
            p.copy_(value.to(device=p.device, dtype=p.dtype))
            safe_set_full_fp32_param(p, value.to(p.device).float())
    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise RuntimeError(f"loading a consolidated state into {type(zero).__name__} is not supported (ZeRO-1/2 "
                           "optimizers only); resume at the original world size or start over with init_from=.")
    base = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    flats = zero.single_partition_of_fp32_groups
    if full.moments:
        for flat in flats:
            base.state[flat] = {"step": torch.tensor(float(full.step)), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
        for name, p in own.items():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue  # no fragment of this parameter lives on this rank
            flat = flats[mapping.param_group_index]
            mapping.set_optim_state_fragment(flat, base.state[flat])
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, full.moments[key][name].to(flat.device).float(), key)
    else:
        log.warning("the checkpoint holds no optimizer moments (saved before the first step?): Adam starts fresh")
    if full.param_groups and len(full.param_groups) != len(base.param_groups):
        raise RuntimeError(f"the checkpoint has {len(full.param_groups)} optimizer param groups and this run "
                           f"{len(base.param_groups)}; resume with the same model and optimizer config.")
    for group, saved in zip(base.param_groups, full.param_groups):
        for key in ("lr", "initial_lr"):
            if key in saved:
                group[key] = saved[key]


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: its values live in per-rank slices (`p.ds_tensor`), not in `p.data`."""
    return hasattr(p, "ds_id")


def partition_rank_world(p: torch.Tensor) -> tuple[int, int]:
    """(rank, world size) of the group `p` is partitioned over."""
    import torch.distributed as dist

    group = getattr(p, "ds_process_group", None)
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def local_values(p: torch.Tensor) -> torch.Tensor:
    """The values of `p` this rank holds: its flat ZeRO-3 slice (padding included), or an ordinary `p` itself."""
    return p.ds_tensor if is_partitioned(p) else p


def owned_numel(p: torch.Tensor) -> int:
    """How many of `local_values(p)` are the parameter's (the rest of a last slice is padding)."""
    if not is_partitioned(p):
        return p.numel()
    rank, world = partition_rank_world(p)
    size = partition_size(p.ds_numel, world)
    return max(0, min(size, p.ds_numel - rank * size))


def full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if is_partitioned(p) else p.shape


def gather_slices(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of shape `full_shape(p)` whose slices the ranks of `p`'s group hold in `local`. Collective:
    every rank of the group calls it for the same parameters in the same order."""
    import torch.distributed as dist

    group = getattr(p, "ds_process_group", None)
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return merge_slices(pieces, p.ds_shape)


def gathered_parameters(model: torch.nn.Module, skip=()) -> dict[str, torch.Tensor]:
    """Every parameter of `model` but those named in `skip`, whole (ZeRO-3 slices gathered one parameter at a time,
    a collective; ordinary parameters as they are)."""
    return {name: gather_slices(local_values(p), p) if is_partitioned(p) else p.detach()
            for name, p in model.named_parameters() if name not in skip}


def release_gathered(params: list[torch.Tensor]) -> None:
    """Drop every gathered copy (`p.data`) of the engine's ZeRO-3 parameters, as the engine does before its
    optimizer step, so that the next forward gathers them afresh from the slices. Local (no communication)."""
    owner = next((p._z3_optimizer for p in params if hasattr(p, "_z3_optimizer")), None)
    if owner is None:
        raise RuntimeError("ZeRO-3 parameters without their optimizer (no _z3_optimizer): only a training engine's "
                           "partitioned parameters can be rewritten here.")
    owner.parameter_offload.partition_all_parameters()


def gather_persistent(params: list[torch.Tensor]) -> None:
    """Gather the small parameters ZeRO-3 keeps whole on every rank ("persistent"), as the engine does after its
    optimizer step. Collective."""
    persistent = [p for p in params if is_partitioned(p) and p.ds_persist]
    if persistent:
        persistent[0].all_gather(param_list=persistent)

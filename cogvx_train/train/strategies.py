"""`trainer=ddp | fsdp | deepspeed_zero2 | deepspeed_zero3`: the distribution strategy, chosen in one place.

DeepSpeed gets our own subclass of Lightning's strategy, `CogvxDeepSpeedStrategy`, for three reasons:

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

FSDP (`trainer=fsdp`: torch's FullyShardedDataParallel, FULL_SHARD, `use_orig_params`, Lightning's sharded
checkpoints) gets `FSDPWithCPUStrategy`, Lightning's FSDPStrategy plus:

* One unit per transformer block (`trainer.wrap_blocks`, on by default): the classes the model names in its
  `no_split_modules` (ExpertBlock) are wrapped as FSDP units of their own, so a block's weights are gathered just
  before it runs and freed after it, and only the rest (embeddings, output head) lives in the root unit; off, the
  whole LightningModule is one unit and all weights are gathered at once. The names of checkpoints and of the EMA
  are the model's own either way (FSDP's state dict and `EMA` drop the `_fsdp_wrapped_module.` level the units add).
* CPU runs. Lightning's accelerator connector refuses FSDPStrategy itself (exactly that class) with any accelerator
  but CUDA, and the strategy hands torch `device_id=root_device.index`, None on the CPU, from which torch infers an
  accelerator and finds none ("FSDP needs a non-CPU accelerator device"). A subclass passes the connector; on a CPU
  it wraps with `device_id=cpu`, and torch's FSDP shards, all-gathers and reduce-scatters over gloo (fp32).
* What the modules assume of their parameters. Outside the root's forward each parameter is this rank's flat 1-D
  piece of it (empty when its shard holds none). So `configure_optimizers` runs inside `summon_full_params`
  (whole shapes choose the weight-decay groups); norm clipping takes the norm over all ranks' shards (the root's
  `clip_grad_norm_`; Lightning's FSDPPrecision refuses norm clipping for want of the root), and so does the logged
  `train/grad_norm` (`gradient_norm`); a direct call of a child module without gradients (validation sampling) and
  each validation step run inside `summon_full_params` of the root unit (the block units gather their own weights
  in their forward, as in training).
* The EMA (`cogvx_train.train.ema`) lives in the parameters' sharded layout: each rank averages its own pieces
  (its update is element-wise), exactly as a whole EMA would. It goes into checkpoints whole (meta.pt is written by
  rank 0 alone, so it is gathered first), is cut into pieces again on load (resume and roll-back), and the weights
  and the EMA are made whole on every rank at the end of training, and the block units unwrapped, for the export.
  Gathering and cutting use FSDP itself (`fsdp_whole_tensors`, `fsdp_local_pieces`).
* Resume at another world size: torch's distributed checkpoint reads the weights and Adam's state saved by any
  number of ranks into this run's shards (with one rank, torch's FSDP holds whole tensors), and the EMA is whole
  in the checkpoint. Saves are atomic like DeepSpeed's (`save_directory_atomically`), so a directory rewritten at
  another world size holds no stale shard.
Modules with manual optimization (the VAE stages) are refused: they toggle `requires_grad` inside the forward,
where FSDP's parameters are views. The weight sync check skips FSDP (sharded by design); tests/scale/test_fsdp_cpu.py
shows 2 CPU ranks train, validate and sample exactly as DDP does, tests/scale/test_resume_world_size.py that a run
of 2 ranks continues on 1 exactly as a DDP run does.

Gradient clipping under DeepSpeed happens inside the engine (`gradient_clipping` in its config): the
LightningModule's `configure_gradient_clipping` is a no-op there, so `build_strategy(gradient_clip_val=...)` puts
`optim.grad_clip` into the engine config.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from omegaconf import DictConfig

from cogvx_train.train.consolidate import merge_slices, partition_size

log = logging.getLogger("cogvx_train")

TIMEOUT = timedelta(minutes=30)


def build_strategy(t: DictConfig, find_unused_parameters: bool = False, gradient_clip_val: float = 0.0):
    """The Lightning strategy for `trainer.strategy` (ddp | fsdp | deepspeed_zero1/2/3 | a Lightning name).

    `gradient_clip_val` (the run's optim.grad_clip) only matters for DeepSpeed, whose engine does the clipping.
    """
    name = str(t.strategy)
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=TIMEOUT)
    if name == "fsdp":
        return FSDPWithCPUStrategy(sharding_strategy="FULL_SHARD", state_dict_type="sharded", use_orig_params=True,
                                   wrap_blocks=bool(t.get("wrap_blocks", True)), timeout=TIMEOUT)
    if name.startswith("deepspeed_zero"):
        return CogvxDeepSpeedStrategy(stage=int(name[-1]), offload_optimizer=bool(t.get("offload_optimizer", False)),
                                      offload_parameters=bool(t.get("offload_parameters", False)),
                                      gradient_clip_val=float(gradient_clip_val or 0.0), timeout=TIMEOUT)
    return name


def _on_cpu(strategy) -> bool:
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(strategy.accelerator, CPUAccelerator)


def _use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks CUDA whenever torch sees a GPU; a CPU run must use its CPU accelerator (and gloo)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing an older one. Directories cannot be renamed over,
    so the old one steps aside to `<target>.old` first; only the instant between the two renames has no `target`,
    and then `<target>.old` is a complete checkpoint (`recover_checkpoint_dir` puts it back)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.exists():
        shutil.rmtree(old)


def save_directory_atomically(strategy, filepath, write) -> None:
    """A sharded checkpoint directory that a kill cannot leave half-written: every rank `write`s its part into
    `<filepath>.tmp`, fsyncs it and meets the others at a barrier; only then rank 0 swaps the finished directory
    in (`swap_in_directory`). A save at another world size than the last one leaves no shard of it behind."""
    target = Path(strategy.broadcast(str(filepath)))
    tmp = target.with_name(target.name + ".tmp")
    if strategy.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)  # left over from a save that was killed
    strategy.barrier("cogvx_save_start")
    write(tmp)
    if tmp.exists():
        _fsync_tree(tmp)
    strategy.barrier("cogvx_save_written")
    if strategy.is_global_zero:
        swap_in_directory(tmp, target)
    strategy.barrier("cogvx_save_done")


def recover_checkpoint_dir(target: Path) -> Path:
    """A checkpoint directory that a crash between the two renames of `swap_in_directory` left as `<target>.old`."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        log.warning("%s is missing but %s is complete (a save was interrupted): using it", target, old)
        os.replace(old, target)
    return target


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
        if not _on_cpu(self):
            return super().setup_environment()
        _use_deepspeed_cpu_accelerator()
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses anything but CUDA

    def setup_distributed(self) -> None:
        if not _on_cpu(self):
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        # the parent also checks that CUDA device indices equal local ranks; CPU devices have no index
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not _on_cpu(self):
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


class FSDPWithCPUStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy plus CPU runs, norm clipping and an EMA kept in the sharded layout (see the module
    docstring). The name starts with "FSDP": the weight sync check skips strategies so named (sharded by design)."""

    strategy_name = "cogvx_fsdp"

    def __init__(self, *args: Any, wrap_blocks: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wrap_blocks = bool(wrap_blocks)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.wrap_blocks and "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            blocks = block_classes(model)
            if blocks:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
            else:
                log.warning("trainer.wrap_blocks: the model names no block classes (no_split_modules); FSDP wraps "
                            "it as one unit")
        if not _on_cpu(self):
            return super()._setup_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        # the parent passes device_id=root_device.index, None on the CPU, from which torch's FSDP infers an
        # accelerator and finds none; the CPU device itself makes it compute (and shard) on the CPU
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)

    def setup_optimizers(self, trainer) -> None:
        """`configure_optimizers` runs after the wrapping, when each parameter is this rank's flat 1-D piece: inside
        `summon_full_params` it sees the same parameter objects with their whole shapes, which choose the
        weight-decay groups (matrices decay, vectors do not)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            super().setup_optimizers(trainer)

    def validation_step(self, *args: Any, **kwargs: Any):
        """Inside `summon_full_params`, not through the root's forward: after a forward without backward FSDP leaves
        the root's parameters gathered (views the module computes with, apart from the parameter objects) and
        itself mid-step, so an EMA swapped into the parameters afterwards (validation sampling) would not be seen."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        with self.precision_plugin.val_step_context(), \
                FullyShardedDataParallel.summon_full_params(self.model, writeback=False, recurse=False):
            return self.lightning_module.validation_step(*args, **kwargs)

    # -------------------------------------------------------------------------------- the EMA's layout
    def setup(self, trainer) -> None:
        if not self.lightning_module.automatic_optimization:
            raise ValueError("trainer=fsdp trains modules with automatic optimization (the DiT stages); the VAE "
                             "stages step their generator and discriminator themselves: use trainer=ddp there.")
        super().setup(trainer)
        if self.is_global_zero:
            kinds = Counter(type(unit.module).__name__ for unit in inner_units(self.lightning_module))
            log.info("FSDP units: the root and %d inner (%s)", sum(kinds.values()),
                     ", ".join(f"{n} x{k}" for n, k in sorted(kinds.items())) or "the whole model is one unit")
        plugin = self.precision_plugin
        self.precision_plugin = FSDPNormClipping(plugin.precision, plugin.scaler, root=lambda: self.model)
        self._alone_hooks = [hook for child in self.lightning_module.children() if any(True for _ in child.parameters())
                             for hook in summon_when_called_alone(self.model, child)]
        # the module built its EMA from the whole weights; from now on it lives in their sharded layout
        for ema in self._emas():
            params = ema_parameters(ema)
            if _any_rank(any(ema.shadow[n].shape != p.shape for n, p in params.items()), self.root_device):
                ema.shadow.update(fsdp_local_pieces(self.model, params, ema.shadow))

    def _emas(self) -> list:
        from cogvx_train.train.callbacks import emas_of

        return emas_of(self.lightning_module)

    def _ema_states(self, checkpoint: dict) -> list[tuple[Any, str]]:
        """(EMA, key) for every EMA of the module whose state the checkpoint holds (matched by parameter names)."""
        found = []
        for ema in self._emas():
            key = next((k for k, v in checkpoint.items() if isinstance(v, dict) and isinstance(v.get("shadow"), dict)
                        and v["shadow"].keys() == ema.shadow.keys()), None)
            if key is not None:
                found.append((ema, key))
        return found

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        """Rank 0 alone writes the non-tensor part (meta.pt): every EMA goes into it whole, gathered from all ranks
        (each holds the pieces of its own shard). The directory is swapped in whole (`save_directory_atomically`)."""
        for ema, key in self._ema_states(checkpoint):
            whole = fsdp_whole_tensors(self.model, ema_parameters(ema), checkpoint[key]["shadow"])
            checkpoint[key] = {**checkpoint[key], "shadow": {n: t.cpu() for n, t in whole.items()}}
        save_directory_atomically(self, filepath, lambda tmp: super(FSDPWithCPUStrategy, self).save_checkpoint(
            checkpoint, tmp, storage_options))

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """The saved EMAs are whole; each rank keeps its pieces (resume, and the non-finite guard's roll-back).
        Torch's distributed checkpoint reads any world size's shards into this one's (resume at another world
        size; tests/scale/test_resume_world_size.py)."""
        if self.is_global_zero:
            recover_checkpoint_dir(Path(checkpoint_path))
        self.barrier("cogvx_fsdp_load_recover")
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        for ema, key in self._ema_states(checkpoint):
            pieces = fsdp_local_pieces(self.model, ema_parameters(ema), checkpoint[key]["shadow"])
            checkpoint[key] = {**checkpoint[key], "shadow": pieces}
        return checkpoint

    def on_train_end(self) -> None:
        """Training is over: make the module whole again (weights and EMA) on every rank, so that what runs after
        fit on rank 0 alone (the export) sees whole tensors, not this rank's pieces."""
        super().on_train_end()
        for hook in getattr(self, "_alone_hooks", []):
            hook.remove()  # the parameters stop being FSDP's pieces below
        params = dict(self.lightning_module.named_parameters())
        for ema in self._emas():
            ema.shadow.update(fsdp_whole_tensors(self.model, ema_parameters(ema), ema.shadow))
        whole = fsdp_whole_tensors(self.model, params, {n: p.detach() for n, p in params.items()})
        with torch.no_grad():
            for name, p in params.items():
                p.data = whole[name].to(p.dtype)
        unwrap_inner_units(self.lightning_module)


def block_classes(model: torch.nn.Module) -> set[type]:
    """The module classes FSDP makes units of their own (`trainer.wrap_blocks`): those that `model` or a module in
    it names in its `no_split_modules` (the DiT: ExpertBlock, which must hold its whole weights while it runs)."""
    names = {name for m in model.modules() for name in getattr(m, "no_split_modules", ())}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def inner_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units inside `module` (the LightningModule the root wraps): one per block with wrap_blocks."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]


def unwrap_inner_units(module: torch.nn.Module) -> None:
    """Put every module an inner FSDP unit wraps back in the unit's place, once the parameters are whole again
    (the end of training): what runs after fit on rank 0 alone (the export) must not reach FSDP, whose state_dict
    and forward are collectives, and sees the model's own module tree and names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            while isinstance(child, FullyShardedDataParallel):
                child = child.module
            if child is not getattr(parent, name):
                setattr(parent, name, child)


def summon_when_called_alone(root, module: torch.nn.Module) -> list:
    """Let `module` (a part of the wrapped LightningModule) run on its own, outside the root's forward, as
    validation sampling and the like call it: FSDP gathers the root unit's parameters only inside the root's
    forward, so such a call (without gradients) runs inside `summon_full_params` of the root unit instead, every
    rank together; inner units (the blocks, with wrap_blocks) gather their own in their forward as in training.
    Whatever this rank's pieces hold then (the live weights, or an EMA swapped into them) is what the module
    computes with. Returns the hook handles."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    open_contexts: list = []

    def enter(_module, _args) -> None:
        alone = not torch.is_grad_enabled() and root.training_state.name == "IDLE"
        context = (FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=False) if alone
                   else None)
        if context is not None:
            context.__enter__()
        open_contexts.append(context)

    def leave(_module, _args, _output) -> None:
        context = open_contexts.pop() if open_contexts else None
        if context is not None:
            context.__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def ema_parameters(ema) -> dict[str, torch.Tensor]:
    """The parameter objects an EMA averages, by its names."""
    return ema._params


def _any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over all ranks (collective decisions must be taken together)."""
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def fsdp_whole_tensors(root, params: dict[str, torch.Tensor], local: dict[str, torch.Tensor]):
    """Whole tensors from `local`, which holds for every parameter in `params` a tensor in that parameter's sharded
    layout on this rank (the flat piece of it in this rank's shard, empty when none is). FSDP gathers them
    itself: they are written into the parameters' pieces, the parameters summoned whole, read, and the live values
    put back. Collective: every rank calls it with the same names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with torch.no_grad():
        live = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():
            p.copy_(local[name])
        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            whole = {n: p.detach().float().clone() for n, p in params.items()}
        for name, p in params.items():
            p.copy_(live[name])
    return whole


def fsdp_local_pieces(root, params: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]):
    """The inverse of `fsdp_whole_tensors`: this rank's pieces of the whole tensors `whole`. Collective."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with torch.no_grad():
        live = {n: p.detach().clone() for n, p in params.items()}
        with FullyShardedDataParallel.summon_full_params(root, writeback=True):
            for name, p in params.items():
                p.copy_(whole[name])
        pieces = {n: p.detach().float().clone() for n, p in params.items()}
        for name, p in params.items():
            p.copy_(live[name])
    return pieces


def gradient_norm(parameters, strategy=None) -> torch.Tensor | None:
    """The global L2 norm of the gradients of `parameters` as the optimizer is about to apply them; None when no
    gradient is held here (DeepSpeed keeps its own partitioned ones, or every gradient was dropped). Under FSDP each
    rank holds the flat pieces of its shard of every gradient (none of some): the squares are summed over the ranks
    (a collective, every rank calls it); otherwise (DDP, one device) the gradients are whole on every rank."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not isinstance(strategy, FSDPStrategy):
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else None
    import torch.distributed as dist

    device = grads[0].device if grads else strategy.root_device
    held = torch.stack([torch.zeros((), device=device), torch.tensor(float(len(grads)), device=device)])
    for g in grads:
        held[0] += g.float().square().sum()
    dist.all_reduce(held, op=dist.ReduceOp.SUM)
    return held[0].sqrt() if held[1] > 0 else None


class FSDPNormClipping(FSDPPrecision):
    """Lightning's FSDPPrecision refuses norm clipping because it lacks the wrapped root module, whose
    `clip_grad_norm_` is the correct one under FSDP: it takes the norm over all ranks' gradient shards (a plain
    `torch.nn.utils.clip_grad_norm_` would clip each rank's shard by its own norm). This one is given the root."""

    def __init__(self, precision, scaler=None, *, root) -> None:
        super().__init__(precision, scaler)
        self._root = root

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # 16-mixed: clip the true gradients
        self._root().clip_grad_norm_(clip_val)


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


# ----------------------------------------------------------------------------------- ZeRO-3 parameter slices
# DeepSpeed's layout: a parameter of n values is flattened and split on its own into world_size slices of
# P = ceil(n / world_size) values; rank r holds values [r*P, (r+1)*P) in `p.ds_tensor`, the tail of the last slices
# being padding (the layout functions live in consolidate.py, which reads checkpoints with the same rule).
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

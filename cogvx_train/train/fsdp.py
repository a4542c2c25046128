"""`trainer=fsdp`: torch's FullyShardedDataParallel (FULL_SHARD, `use_orig_params`, Lightning's sharded checkpoints)
as `FSDPWithCPUStrategy`, Lightning's FSDPStrategy plus:

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
* Resume at another world size or wrapping: torch's distributed checkpoint reads the weights and Adam's state
  saved by any number of ranks, under either `trainer.wrap_blocks` (the names are the model's own), into this
  run's shards (with one rank, torch's FSDP holds whole tensors), and the EMA is whole in the checkpoint. Saves
  are atomic like DeepSpeed's (`save_directory_atomically`), so a directory rewritten at another world size holds
  no stale shard.
Modules with manual optimization (the VAE stages) are refused: they toggle `requires_grad` inside the forward,
where FSDP's parameters are views. The weight sync check skips FSDP (sharded by design); tests/scale/test_fsdp_cpu.py
shows 2 CPU ranks train, validate and sample exactly as DDP does, tests/scale/test_resume_world_size.py that a run
of 2 ranks continues on 1, also with the other wrapping, exactly as a DDP run does.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy

from cogvx_train.train.strategies import on_cpu, recover_checkpoint_dir, save_directory_atomically

log = logging.getLogger("cogvx_train")


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
        if not on_cpu(self):
            return super()._setup_model(model)
        from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel

        if self.cpu_offload.offload_params:
            # torch's offload keeps the CPU copies in pinned memory for the GPU transfers, which needs CUDA; on a CPU
            # run the parameters are where the offload would put them
            log.warning("trainer.cpu_offload=true: this run's parameters live on the CPU already; FSDP's offload "
                        "(pinned host memory for GPU transfers) applies to GPU runs and is left off here.")
            self.cpu_offload = CPUOffload(offload_params=False)
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
            log.info("FSDP units: the root and %d inner (%s); CPU offload of parameters and gradients: %s",
                     sum(kinds.values()),
                     ", ".join(f"{n} x{k}" for n, k in sorted(kinds.items())) or "the whole model is one unit",
                     "on" if self.cpu_offload.offload_params else "off")
        plugin = self.precision_plugin
        self.precision_plugin = CogvxFSDPPrecision(plugin.precision, plugin.scaler, root=lambda: self.model,
                                                   device_type=self.root_device.type)
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


class CogvxFSDPPrecision(FSDPPrecision):
    """Lightning's FSDPPrecision, given the wrapped root module and the run's device, for two things it gets wrong:

    * Norm clipping: the parent refuses it for want of the root, whose `clip_grad_norm_` is the correct one under
      FSDP: it takes the norm over all ranks' gradient shards (a plain `torch.nn.utils.clip_grad_norm_` would clip
      each rank's shard by its own norm).
    * Autocast on a CPU: the parent's forward context under "bf16-mixed" / "16-mixed" is CUDA autocast whatever the
      device, so on a CPU nothing ran under autocast, and an inner unit (a block: FSDP casts only the root's inputs
      to the compute dtype) met the fp32 timestep embedding with bf16 weights and failed. Autocast here is on the
      run's own device type.
    """

    def __init__(self, precision, scaler=None, *, root, device_type: str = "cuda") -> None:
        super().__init__(precision, scaler)
        self._root = root
        self._device_type = device_type

    def forward_context(self):
        if "mixed" in self.precision:
            dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
            return torch.autocast(self._device_type, dtype=dtype)
        return super().forward_context()

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # 16-mixed: clip the true gradients
        self._root().clip_grad_norm_(clip_val)

"""Exponential moving average of a model's weights, kept in fp32 next to the live weights.

The EMA is a plain object, not an ``nn.Module``: it must not appear among the module's parameters (the optimizer
would see it) nor in ``state_dict()`` under the model's names. The LightningModule stores it in the checkpoint
explicitly (``on_save_checkpoint``) and swaps it in for validation and export with :meth:`EMA.swapped_into`.

Under DeepSpeed ZeRO-3 the EMA is sharded like the weights: each rank averages only its own slice of every
parameter (``p.ds_tensor``, see ``zero.py``), so the shadow costs 4 bytes per parameter divided by the world
size, as the fp32 master weights do; a whole shadow per rank would be the full model in fp32 on every rank, the very
memory ZeRO-3 exists to save, and gathering each weight to update it (deepspeed.zero.GatheredParameters) would add
an all-gather of the whole model to every step. The update is local instead (the optimizer step left each rank's
slice current; like the whole-model EMA it reads the module's weights, bf16 under bf16-mixed), and so are save and
load: DeepSpeed writes one model-states file per rank, and each rank's Lightning state (this EMA's
slices with their rank and world size) goes into its own and comes back from it on resume or roll-back at the same
world size. Whole tensors are gathered only where they are needed: :meth:`EMA.full_shadow` (every rank together,
for the export), and ``consolidate.py`` merges the slices of all ranks' files (``cogvx-convert``). Swapping the
EMA in rewrites each rank's slice and lets the engine's forward gather it (:meth:`EMA.swapped_into`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cogvx_train.train.consolidate import slice_of
from cogvx_train.train.zero import (full_shape, gather_persistent, gather_slices, is_partitioned, local_values,
                                          owned_numel, partition_rank_world, release_gathered)


class EMA:
    """shadow <- d * shadow + (1 - d) * weight, once per optimizer step, d = min(decay, (1 + n) / (10 + n)).

    n counts the updates so far. The warm-up of d (the formula diffusers' EMAModel uses) keeps a short run's shadow
    from being mostly the random initialisation: with a constant 0.99 the start still weighs 0.99^100 = 37% after
    100 steps, so validation (which uses the EMA) would lag far behind training. ``warmup=False`` uses d = decay.

    Before ``start_step`` the shadow simply follows the weights (an average over the random initialisation and the
    first fast-moving steps would only have to be forgotten again).

    A skipped optimizer step (non-finite gradients, see ``NonFiniteGuard``) must not count as one: folding the
    unchanged weights in again would still pull the shadow towards them. Whoever skips the step calls
    :meth:`skip_next_update` before the owner of the EMA calls :meth:`update`, which then leaves the shadow alone.
    """

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} must lie strictly between 0 and 1, e.g. 0.9999.")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.warmup = bool(warmup)
        self.num_updates = 0
        # the averaged weights, kept as references: a ZeRO-3 engine partitions these same objects in place later
        self._params = _trainable(model)
        self.shadow: dict[str, torch.Tensor] = {name: _local_copy(p) for name, p in self._params.items()}
        # which optimizer steps this EMA's weights: the one that holds these parameter objects
        self._param_ids = frozenset(id(p) for p in self._params.values())
        self._skip_next: Callable[[], bool] | None = None

    def _aligned(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The shadow of parameter `like` in its layout on this rank (whole, or the rank's ZeRO-3 slice)."""
        shadow = self.shadow[name]
        if is_partitioned(like) and shadow.shape != like.ds_tensor.shape:
            # built whole before the engine partitioned the model: keep this rank's slice only
            shadow = self.shadow[name] = slice_of(shadow, *partition_rank_world(like))
        # the LightningModule moves the model to its device after the EMA was built: follow it lazily
        device = local_values(like).device
        if shadow.device != device:
            shadow = self.shadow[name] = shadow.to(device)
        return shadow

    def _named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = _trainable(model)
        self._check_names(params)
        return params

    def _check_names(self, params: dict[str, torch.Tensor]) -> None:
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:3]
            extra = sorted(params.keys() - self.shadow.keys())[:3]
            raise ValueError(f"the model's trainable parameters do not match the EMA's (missing {missing}, "
                             f"unexpected {extra}); build the EMA from the same model.")

    def tracks(self, parameters: Iterable[torch.Tensor]) -> bool:
        """Whether any of ``parameters`` is one of the weights this EMA averages (an optimizer's params)."""
        return any(id(p) in self._param_ids for p in parameters)

    def skip_next_update(self, skipped: Callable[[], bool] | None = None) -> None:
        """The optimizer step in progress does not change the weights: the next :meth:`update` folds nothing in.

        ``skipped``, when given, is asked at that update instead: an engine that decides inside its own ``step()``
        whether the update is applied (DeepSpeed's overflow check) is only known to have skipped afterwards.
        """
        self._skip_next = skipped if skipped is not None else _always

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights in; ``step`` is the optimizer step that produced them. Nothing happens when
        that step was skipped (:meth:`skip_next_update`)."""
        skip, self._skip_next = self._skip_next, None
        if skip is not None and skip():
            return
        params = self._named(model)
        follow = step < self.start_step
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        for name, p in params.items():
            shadow, weight = _owned_part(self._aligned(name, p), p), _weights_of(p)
            if follow:
                shadow.copy_(weight.detach())
            else:
                shadow.lerp_(weight.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = self._named(model)
        _write(params, {name: self._aligned(name, p) for name, p in params.items()})

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model carries the EMA weights; the live weights come back afterwards, even on error.
        Under ZeRO-3 every rank of the group enters and leaves together (the small persistent parameters are
        gathered on both ways)."""
        params = self._named(model)
        live = {name: _weights_of(p).detach().clone() for name, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                _write(params, live)

    @torch.no_grad()
    def full_shadow(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights, on every rank. Under ZeRO-3 the slices are gathered one parameter at a time:
        every rank of the group calls this together."""
        return {name: gather_slices(self._aligned(name, p), p) if is_partitioned(p) else self.shadow[name]
                for name, p in self._params.items()}

    def state_dict(self) -> dict:
        """Decay, counters and the shadow in this rank's layout; under ZeRO-3 also `partition`: this rank, the world
        size and the whole shape of each sliced entry, which is what merging the ranks' slices needs."""
        state = {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
                 "warmup": self.warmup,
                 "shadow": {name: (self._aligned(name, p) if is_partitioned(p) else self.shadow[name]).detach().cpu()
                            for name, p in self._params.items()}}
        sliced = {name: p for name, p in self._params.items() if is_partitioned(p)}
        if sliced:
            rank, world = partition_rank_world(next(iter(sliced.values())))
            state["partition"] = {"rank": rank, "world_size": world,
                                  "shapes": {name: list(full_shape(p)) for name, p in sliced.items()}}
        return state

    def load_state_dict(self, state: dict) -> None:
        names = state["shadow"].keys()
        if names != self.shadow.keys():
            missing = sorted(self.shadow.keys() - names)[:3]
            extra = sorted(names - self.shadow.keys())[:3]
            raise ValueError(f"the EMA state does not match the model (missing {missing}, unexpected {extra}); "
                             "it was saved for a different model.")
        saved = state.get("partition")
        loaded = {name: self._loaded_entry(name, t, saved) for name, t in state["shadow"].items()}
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints written before the warm-up existed had none
        self._skip_next = None
        for name, t in loaded.items():
            self.shadow[name] = t.float().to(self.shadow[name].device)

    def _loaded_entry(self, name: str, t: torch.Tensor, saved: dict | None) -> torch.Tensor:
        """A saved shadow entry in this rank's layout: a whole one as it is (sliced under ZeRO-3), a ZeRO-3 slice
        only into the same rank of the same world size."""
        p = self._params[name]
        shape = tuple(full_shape(p) if is_partitioned(p) else self.shadow[name].shape)
        if saved is None or name not in saved["shapes"]:
            if tuple(t.shape) != shape:
                raise ValueError(f"EMA entry {name} has shape {tuple(t.shape)} but the model's parameter has "
                                 f"{shape}; it was saved for a different model size.")
            return slice_of(t, *partition_rank_world(p)) if is_partitioned(p) else t
        rank, world = int(saved["rank"]), int(saved["world_size"])
        if tuple(saved["shapes"][name]) != shape:
            raise ValueError(f"EMA entry {name} is a slice of a {tuple(saved['shapes'][name])} parameter but the "
                             f"model's has {shape}; it was saved for a different model size.")
        if not is_partitioned(p):
            raise ValueError(f"the EMA state holds rank {rank}'s ZeRO-3 slices of {world} ranks, not whole weights; "
                             "merge the ranks' slices first (python -m cogvx_train.cli.convert <ckpt> --out w.ckpt).")
        if partition_rank_world(p) != (rank, world) or t.shape != p.ds_tensor.shape:
            here_rank, here_world = partition_rank_world(p)
            raise ValueError(f"the EMA state holds rank {rank}'s ZeRO-3 slices of {world} ranks and this is rank "
                             f"{here_rank} of {here_world}; a ZeRO-3 run resumes at the world size that wrote it "
                             "(or convert the checkpoint and start with init_from=).")
        return t


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name; FSDP units inside it (one per block, trainer.wrap_blocks) add a
    `_fsdp_wrapped_module.` level to the names, which is not part of the model's own."""
    return {name.replace("_fsdp_wrapped_module.", ""): p for name, p in model.named_parameters() if p.requires_grad}


def _local_copy(p: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of the values of `p` this rank holds; a ZeRO-3 slice's padding is zeroed (DeepSpeed leaves it
    uninitialised)."""
    copy = local_values(p).detach().float().clone()
    if is_partitioned(p):
        copy[owned_numel(p):] = 0
    return copy


def _weights_of(p: torch.Tensor) -> torch.Tensor:
    """The values of `p` on this rank: `p` itself, or its ZeRO-3 slice without the padding."""
    return p.ds_tensor[: owned_numel(p)] if is_partitioned(p) else p


def _owned_part(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of `local` (a tensor in the layout of `p` on this rank) that corresponds to `_weights_of(p)`."""
    return local[: owned_numel(p)] if is_partitioned(p) else local


def _write(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Set the weights to `values` (each in its parameter's layout on this rank). ZeRO-3 slices are rewritten with
    no gathered copy alive, so the next forward gathers the new values; the persistent ones are gathered again."""
    sliced = [p for p in params.values() if is_partitioned(p)]
    if sliced:
        release_gathered(sliced)
    for name, p in params.items():
        _weights_of(p).copy_(_owned_part(values[name], p))
    if sliced:
        gather_persistent(sliced)


def _always() -> bool:
    return True

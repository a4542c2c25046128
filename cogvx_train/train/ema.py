"""Exponential moving average of a model's weights, kept in fp32 next to the live weights.

The EMA is a plain object, not an ``nn.Module``: it must not appear among the module's parameters (the optimizer
would see it) nor in ``state_dict()`` under the model's names. The LightningModule stores it in the checkpoint
explicitly (``on_save_checkpoint``) and swaps it in for validation and export with :meth:`EMA.swapped_into`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        # which optimizer steps this EMA's weights: the one that holds these parameter objects
        self._param_ids = frozenset(id(p) for p in model.parameters() if p.requires_grad)
        self._skip_next: Callable[[], bool] | None = None

    def _aligned(self, name: str, like: torch.Tensor) -> torch.Tensor:
        # the LightningModule moves the model to its device after the EMA was built: follow it lazily
        shadow = self.shadow[name]
        if shadow.device != like.device:
            shadow = self.shadow[name] = shadow.to(like.device)
        return shadow

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
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._check_names(params)
        follow = step < self.start_step
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        for name, p in params.items():
            shadow = self._aligned(name, p)
            if follow:
                shadow.copy_(p.detach())
            else:
                shadow.lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._check_names(params)
        for name, p in params.items():
            p.copy_(self._aligned(name, p).to(p.dtype))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block the model carries the EMA weights; the live weights come back afterwards, even on error."""
        live = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in live:
                        p.copy_(live[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "num_updates": self.num_updates,
                "warmup": self.warmup, "shadow": {name: t.detach().cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        names = state["shadow"].keys()
        if names != self.shadow.keys():
            missing = sorted(self.shadow.keys() - names)[:3]
            extra = sorted(names - self.shadow.keys())[:3]
            raise ValueError(f"the EMA state does not match the model (missing {missing}, unexpected {extra}); "
                             "it was saved for a different model.")
        for name, t in state["shadow"].items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA entry {name} has shape {tuple(t.shape)} but the model's parameter has "
                                 f"{tuple(self.shadow[name].shape)}; it was saved for a different model size.")
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints written before the warm-up existed had none
        self._skip_next = None
        for name, t in state["shadow"].items():
            self.shadow[name] = t.float().to(self.shadow[name].device)


def _always() -> bool:
    return True

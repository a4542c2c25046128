"""A step the NonFiniteGuard skips leaves the EMA alone: `EMA.skip_next_update` and the guard's choice of which
EMA a skipped optimizer owns (the VAE's EMA follows the generator, not the discriminator), under DDP-style
optimizers and under a DeepSpeed-style engine that decides inside its own step (verdict read afterwards)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from cogvx_train.train.callbacks import NonFiniteGuard
from cogvx_train.train.ema import EMA


class TwoModels(nn.Module):
    """A generator with an EMA and a discriminator without one, like VAETrainingModule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vae = nn.Linear(3, 3)
        self.discriminator = nn.Linear(3, 1)
        self.ema = EMA(self.vae, decay=0.5)
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs) -> None:
        self.logged[name] = float(value)


def _shadow(ema: EMA) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ema.shadow.values()]).clone()


def _train_step(model: TwoModels, opt: torch.optim.Optimizer, params, guard: NonFiniteGuard, trainer,
                grad_value: float) -> None:
    """backward (gradients = grad_value), the guard's check, the optimizer step; then the caller updates the EMA."""
    for p in params:
        p.grad = torch.full_like(p, grad_value)
    guard.on_before_optimizer_step(trainer, model, opt)
    opt.step()


def test_skip_next_update_leaves_the_shadow_and_count_alone_once():
    model = nn.Linear(4, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = _shadow(ema)
    ema.skip_next_update()
    ema.update(model, step=0)
    assert torch.equal(_shadow(ema), before) and ema.num_updates == 0
    ema.update(model, step=1)  # only the one update is skipped
    assert not torch.equal(_shadow(ema), before) and ema.num_updates == 1
    moved = _shadow(ema)
    ema.skip_next_update(lambda: False)  # a deferred verdict that turned out "applied"
    ema.update(model, step=2)
    assert not torch.equal(_shadow(ema), moved) and ema.num_updates == 2


def test_guard_skips_the_ema_of_the_optimizer_that_skipped_only():
    model = TwoModels()
    opt_g = torch.optim.SGD(model.vae.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(model.discriminator.parameters(), lr=0.1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(), optimizers=[opt_g, opt_d], global_step=1)
    guard = NonFiniteGuard(max_consecutive=3)

    # a bad generator step: its weights and the EMA stay, and the training step counts as skipped
    weights, shadow = [p.detach().clone() for p in model.vae.parameters()], _shadow(model.ema)
    _train_step(model, opt_g, list(model.vae.parameters()), guard, trainer, float("nan"))
    model.ema.update(model.vae, step=0)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.vae.parameters()))
    assert torch.equal(_shadow(model.ema), shadow) and model.ema.num_updates == 0
    _train_step(model, opt_d, list(model.discriminator.parameters()), guard, trainer, 1.0)
    guard.on_train_batch_end(trainer, model, None, None, 0)
    assert (guard.total_skipped, guard.consecutive) == (1, 1)
    assert model.logged["train/skipped_nonfinite_steps"] == 1.0

    # a good generator step and a bad discriminator step: the EMA follows the generator, which did step
    _train_step(model, opt_g, list(model.vae.parameters()), guard, trainer, 1.0)
    model.ema.update(model.vae, step=1)
    assert not torch.equal(_shadow(model.ema), shadow) and model.ema.num_updates == 1
    disc = [p.detach().clone() for p in model.discriminator.parameters()]
    _train_step(model, opt_d, list(model.discriminator.parameters()), guard, trainer, float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(disc, model.discriminator.parameters()))
    shadow = _shadow(model.ema)
    guard.on_train_batch_end(trainer, model, None, None, 1)
    assert guard.total_skipped == 2  # the step still counts as skipped (its D update was)
    _train_step(model, opt_g, list(model.vae.parameters()), guard, trainer, 1.0)
    model.ema.update(model.vae, step=2)  # the D verdict of the last step does not leak into this update
    assert not torch.equal(_shadow(model.ema), shadow) and model.ema.num_updates == 2


class FakeEngine:
    """The part of a DeepSpeed engine the guard reads: `skipped_steps`, raised by step() on an overflow."""

    def __init__(self) -> None:
        self.skipped_steps = 0

    def step(self, overflow: bool) -> None:
        self.skipped_steps += int(overflow)


def test_guard_reads_the_deepspeed_engine_verdict_after_its_step():
    model = TwoModels()
    engine = FakeEngine()
    opt = SimpleNamespace(param_groups=[])  # ZeRO's wrapper: its flat partitions are out of the guard's reach
    trainer = SimpleNamespace(strategy=SimpleNamespace(deepspeed_engine=engine), optimizers=[opt], global_step=1)
    guard = NonFiniteGuard(max_consecutive=3)
    with torch.no_grad():
        model.vae.weight.add_(1.0)  # the live weights differ from the shadow, so an update would move it

    shadow = _shadow(model.ema)
    guard.on_before_optimizer_step(trainer, model, opt)
    engine.step(overflow=True)
    model.ema.update(model.vae, step=0)
    guard.on_train_batch_end(trainer, model, None, None, 0)
    assert torch.equal(_shadow(model.ema), shadow) and model.ema.num_updates == 0
    assert (guard.total_skipped, guard.consecutive) == (1, 1)

    guard.on_before_optimizer_step(trainer, model, opt)
    engine.step(overflow=False)
    model.ema.update(model.vae, step=1)
    guard.on_train_batch_end(trainer, model, None, None, 1)
    assert not torch.equal(_shadow(model.ema), shadow) and model.ema.num_updates == 1
    assert (guard.total_skipped, guard.consecutive) == (1, 0)

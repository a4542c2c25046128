"""EMA of model weights: the update rule, start step, swapping in and out, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvx_train.train.ema import EMA


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2))


def perturb(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def test_update_rule():
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    perturb(model, 1.0)
    ema.update(model, step=0)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], 0.9 * before[name] + 0.1 * p.detach())
    assert ema.num_updates == 1


def test_decay_warms_up_then_holds():
    model = make_model()
    ema = EMA(model, decay=0.5)
    for n in range(4):
        before = {k: v.clone() for k, v in ema.shadow.items()}
        perturb(model, 1.0)
        ema.update(model, step=n)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25, 0.31: the start is forgotten fast
        for name, p in model.named_parameters():
            assert torch.allclose(ema.shadow[name], d * before[name] + (1 - d) * p.detach())
    ema.num_updates = 20  # (1 + 20) / (10 + 20) = 0.7 > 0.5: from here on the configured decay holds
    before = {k: v.clone() for k, v in ema.shadow.items()}
    perturb(model, 1.0)
    ema.update(model, step=20)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.shadow[name], 0.5 * before[name] + 0.5 * p.detach())


def test_shadow_follows_weights_before_start_step():
    model = make_model()
    ema = EMA(model, decay=0.99, start_step=3)
    perturb(model, 0.5)
    ema.update(model, step=2)
    for name, p in model.named_parameters():
        assert torch.equal(ema.shadow[name], p.detach())
    perturb(model, 0.5)
    ema.update(model, step=3)
    for name, p in model.named_parameters():
        assert not torch.allclose(ema.shadow[name], p.detach())


def test_swapped_into_uses_ema_weights_and_restores_live_ones_even_on_error():
    model = make_model()
    ema = EMA(model, decay=0.5)
    perturb(model, 1.0)
    ema.update(model, step=0)
    live = {k: v.detach().clone() for k, v in model.named_parameters()}
    with ema.swapped_into(model):
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), ema.shadow[name])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), live[name])
    with pytest.raises(RuntimeError):
        with ema.swapped_into(model):
            raise RuntimeError("validation failed")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), live[name])


def test_state_dict_round_trip_and_mismatch():
    model = make_model()
    ema = EMA(model, decay=0.9, start_step=1)
    perturb(model, 0.3)
    ema.update(model, step=5)
    state = ema.state_dict()
    other = EMA(make_model(seed=1), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and other.start_step == 1 and other.num_updates == 1 and other.warmup
    for name in ema.shadow:
        assert torch.equal(other.shadow[name], ema.shadow[name])

    wrong = EMA(nn.Sequential(nn.Linear(3, 5)), decay=0.9)
    with pytest.raises(ValueError, match="different model"):
        wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)

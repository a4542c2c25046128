"""Warmup + cosine / linear / constant lr multipliers and their use through LambdaLR (incl. resume)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from cogvx_train.train.lr_schedule import build_lr_lambda


def test_warmup_is_linear_and_reaches_one():
    f = build_lr_lambda(warmup_steps=4, total_steps=20, schedule="cosine", min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # first decay step starts at the peak


def test_cosine_endpoints_midpoint_and_floor():
    f = build_lr_lambda(warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way: (1 + min) / 2
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # held at the floor after the run's end
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    lin = build_lr_lambda(warmup_steps=0, total_steps=100, schedule="linear", min_lr_ratio=0.0)
    assert lin(0) == pytest.approx(1.0)
    assert lin(25) == pytest.approx(0.75)
    assert lin(100) == pytest.approx(0.0)
    const = build_lr_lambda(warmup_steps=2, total_steps=None, schedule="constant")
    assert [const(s) for s in (0, 1, 2, 10**6)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(warmup_steps=0, total_steps=None, schedule="cosine"), "finite total"),
    (dict(warmup_steps=0, total_steps=float("inf"), schedule="linear"), "finite total"),
    (dict(warmup_steps=50, total_steps=10, schedule="cosine"), "longer than the run"),
    (dict(warmup_steps=0, total_steps=10, schedule="step"), "not one of"),
    (dict(warmup_steps=-1, total_steps=10, schedule="cosine"), "warmup_steps"),
    (dict(warmup_steps=0, total_steps=10, schedule="cosine", min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_bad_settings_raise_one_clear_sentence(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_lr_lambda(**kwargs)


def test_lambda_lr_drives_the_optimizer_and_resumes_on_the_same_curve():
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, LambdaLR(opt, build_lr_lambda(3, 12, "cosine", 0.2))

    opt, sched = make()
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])

    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    # what a checkpoint holds: optimizer (its current lr) and scheduler (the multiplier object is picklable)
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    opt2, sched2 = make()
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed = []
    for _ in range(7):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(seen[5:])

"""`compile: true` (torch.compile of every block) and the real-arithmetic RoPE that compiled code runs."""

import pytest
import torch

from cogvx_train.dit import build_dit, rope3d_frequencies
from cogvx_train.dit.rope3d import rotate_, rotation

from test_dit_model import inputs, randomized  # same folder (pytest puts it on sys.path)


@pytest.mark.parametrize("inverse", [False, True])
def test_real_rotation_matches_complex_rotation(monkeypatch, inverse):
    rot = rotation(*rope3d_frequencies(2, 3, 4, 64))  # [24, 1, 32, 2]
    torch.manual_seed(0)
    x = torch.randn(2, 24, 3, 64)
    eager = x.clone()
    rotate_(eager, rot, inverse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the branch compiled code takes
    real = x.clone()
    rotate_(real, rot, inverse)
    assert not torch.allclose(real, x, atol=1e-3)  # it rotates
    torch.testing.assert_close(real, eager, rtol=0, atol=1e-6)
    rotate_(real, rot, not inverse)  # orthogonal: the inverse undoes it
    torch.testing.assert_close(real, x, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_keep_names():
    eager = randomized(build_dit("tiny"))
    compiled = build_dit("tiny", compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    assert all(block._compiled_call_impl is not None for block in compiled.transformer_blocks)
    assert eager.transformer_blocks[0]._compiled_call_impl is None
    latents, t, text = inputs()
    for model in (eager, compiled):
        model(latents, t, text).square().mean().backward()
    torch.testing.assert_close(compiled(latents, t, text), eager(latents, t, text), rtol=0, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)

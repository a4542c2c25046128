"""Where LPIPS weights come from: a local backbone file, torchvision, or an explicitly allowed random backbone."""

from __future__ import annotations

import logging
import urllib.error
import warnings

import lpips
import pytest
import torch

from cogvx_train.vae.lpips_loss import PerceptualLoss, build_lpips


@pytest.fixture(scope="module")
def random_alex() -> lpips.LPIPS:
    return build_lpips("alex", random_backbone=True)


def other_backbone_state(seed: int) -> dict[str, torch.Tensor]:
    """An alexnet backbone that differs from the seeded random one, as {lpips key: tensor}."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated pretrained= flag
        torch.manual_seed(seed)
        model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    return model.net.state_dict()


def test_random_backbone_only_when_asked_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="cogvx_train.vae.lpips_loss"):
        a = build_lpips("alex", random_backbone=True)
    assert "RANDOMLY INITIALISED" in caplog.text
    b = build_lpips("alex", random_backbone=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # seeded: every rank and run measures with the same network


def test_linear_layers_come_from_the_package(random_alex):
    import os

    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"),
                         map_location="cpu")
    for key, value in shipped.items():
        assert torch.equal(random_alex.state_dict()[key], value)


def test_backbone_from_a_torchvision_checkpoint(tmp_path, random_alex):
    net_state = other_backbone_state(seed=7)
    # torchvision's layout: features.<i>.* plus a classifier that LPIPS does not use
    tv_state = {f"features.{k.split('.', 1)[1]}": v for k, v in net_state.items()}
    tv_state["classifier.1.weight"] = torch.zeros(4, 4)
    path = tmp_path / "alexnet-local.pth"
    torch.save(tv_state, path)
    loaded = build_lpips("alex", backbone_path=str(path))
    for key, value in net_state.items():
        assert torch.equal(loaded.net.state_dict()[key], value), key
        assert not torch.equal(random_alex.net.state_dict()[key], value) or key.endswith("bias")


def test_backbone_from_an_lpips_state_dict(tmp_path):
    net_state = other_backbone_state(seed=8)
    path = tmp_path / "lpips-net.pth"
    torch.save({f"net.{k}": v for k, v in net_state.items()}, path)
    loaded = build_lpips("alex", backbone_path=str(path))
    for key, value in net_state.items():
        assert torch.equal(loaded.net.state_dict()[key], value), key


def test_wrong_or_missing_backbone_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_lpips("alex", backbone_path=str(tmp_path / "nope.pth"))
    vgg_like = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}
    torch.save(vgg_like, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="does not hold alex backbone weights"):
        build_lpips("alex", backbone_path=str(tmp_path / "vgg.pth"))
    bad_shapes = {f"features.{k.split('.', 1)[1]}": v[..., :1] if v.ndim == 4 else v
                  for k, v in other_backbone_state(seed=9).items()}
    torch.save(bad_shapes, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="another network"):
        build_lpips("alex", backbone_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="lpips_net"):
        build_lpips("squeeze", random_backbone=True)


def test_no_download_possible_gives_one_clear_sentence(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="lpips_backbone_path.*lpips_random_backbone=true"):
        build_lpips("alex")


def test_perceptual_loss_frozen_eval_fp32_and_differentiable_in_input():
    loss = PerceptualLoss("alex", random_backbone=True)
    loss.train()
    assert not loss.training and not loss.lpips.training
    assert not any(p.requires_grad for p in loss.parameters())
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = loss(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32 and torch.all(d > 0)
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(loss(y, y), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="too small"):
        loss(x[..., :16, :16], y[..., :16, :16])

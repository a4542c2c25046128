"""Fixtures of the scale-out tests: a tiny diffusers-format VAE and the synthetic dataset, made once per session
before any rank starts (so ranks never race to build them). Helpers live in scale_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory, cache_dir) -> Path:
    import torch

    from cogvx_train.data.synthetic import ensure_default_dataset
    from cogvx_train.vae import build_vae, export_diffusers_vae

    ensure_default_dataset(cache_dir)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("scale-vae") / "vae"
    export_diffusers_vae(build_vae("tiny"), out)
    return out

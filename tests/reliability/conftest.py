"""Fixtures of the reliability tests (helpers in reliability_helpers.py, on sys.path as this test folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def dataset(cache_dir) -> Path:
    """The synthetic demo set, generated once before any subprocess needs it (no two runs race to build it)."""
    from cogvx_train.data.synthetic import ensure_default_dataset

    return ensure_default_dataset(cache_dir)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A diffusers-format tiny VAE with seeded random weights: the frozen VAE of the DiT runs."""
    from cogvx_train.vae import build_vae, export_diffusers_vae

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-vae")
    export_diffusers_vae(build_vae("tiny"), str(out))
    return out

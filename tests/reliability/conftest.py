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
    """A diffusers-format VAE with seeded random weights, of the size the demo DiT runs expect (model.vae.size and
    model.vae.overrides of `stage=dit_b1 experiment=demo`): the frozen VAE of the DiT runs."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cogvx_train.config import resolvers
    from cogvx_train.vae import build_vae, export_diffusers_vae

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        vae = compose(config_name="train", overrides=["stage=dit_b1", "experiment=demo"]).model.vae
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-vae")
    export_diffusers_vae(build_vae(vae.size, **OmegaConf.to_container(vae.overrides, resolve=True)), str(out))
    return out

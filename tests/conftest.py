"""Shared test setup: every test runs offline, writes under tmp dirs, and shares one synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (synthetic dataset, demo VAE) for the whole session; CI may point COGVX_CACHE elsewhere."""
    path = Path(os.environ.get("COGVX_CACHE") or tmp_path_factory.mktemp("cogvx-cache"))
    os.environ["COGVX_CACHE"] = str(path)
    return path


@pytest.fixture()
def cli_env(cache_dir, tmp_path) -> dict[str, str]:
    """Environment for running the console scripts in a subprocess, from a directory outside the repo."""
    env = dict(os.environ)
    env["COGVX_CACHE"] = str(cache_dir)
    env["COGVX_OUTPUT_DIR"] = str(tmp_path / "outputs")
    env["WANDB_MODE"] = "offline"
    return env

"""Fixtures for the data tests: a tiny synthetic set shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cogvx_train.data.synthetic import generate_synthetic_dataset


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory) -> Path:
    """12 clips (33-49 frames, 8-16 fps) and 6 stills in three aspect ratios, seed 3."""
    out = tmp_path_factory.mktemp("synthetic") / "set"
    return generate_synthetic_dataset(out, num_videos=12, num_images=6, seed=3)

"""Every stage composes from the packaged configs, lists only differences, and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cogvx_train.config import resolvers
from cogvx_train.config.validate import derive

STAGES = ["vae_a1", "vae_a2", "dit_b1", "dit_b2", "dit_b3", "dit_b4"]


def load(overrides: list[str]):
    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    cfg = load([f"stage={stage}"])
    assert cfg.stage_name == stage
    assert cfg.task == ("vae" if stage.startswith("vae") else "dit")
    assert (cfg.data.num_frames - 1) % 4 == 0


def test_stage_files_list_only_differences():
    import cogvx_train.conf as conf

    stage_dir = Path(conf.__file__).parent / "stage"
    defaults = OmegaConf.load(Path(conf.__file__).parent / "train.yaml")
    for path in stage_dir.glob("*.yaml"):
        stage = OmegaConf.load(path)
        for section in ("optim", "vae_loss", "diffusion"):
            for key, value in (stage.get(section) or {}).items():
                assert defaults[section][key] != value, f"{path.name} repeats the default {section}.{key}={value}"


def test_paper_stage_values():
    a1 = load(["stage=vae_a1"])
    assert a1.data.num_frames == 17 and list(a1.data.fps) == [8, 16] and [list(r) for r in a1.data.resolutions] == [[256, 256]]
    b1 = load(["stage=dit_b1"])
    assert b1.data.num_frames == 49 and b1.data.fps == 8
    b2 = load(["stage=dit_b2"])
    assert [list(r) for r in b2.data.resolutions] == [[480, 720]]
    assert load(["stage=dit_b1", "model=5b"]).diffusion.snr_shift == 1.0
    assert load(["stage=dit_b1", "model=2b"]).diffusion.snr_shift == 3.0


def test_demo_experiment_shrinks_everything():
    cfg = load(["stage=vae_a1", "experiment=demo"])
    assert cfg.model.name == "tiny" and cfg.trainer.accelerator == "cpu" and cfg.vae_loss.lpips_random_backbone


def test_derived_values():
    cfg = load(["stage=dit_b1", "experiment=demo"])
    d = derive(cfg, world_size=3)
    assert d["global_batch_size"] == cfg.data.batch_size * 3
    assert d["latent_frames"] == 3
    assert d["timestep_interval_per_rank"][1] == [333.333, 666.667]
    assert d["buckets"][0]["latent_shape"] == [16, 3, 4, 4]

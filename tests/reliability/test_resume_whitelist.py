"""`resume=` continues the same run or refuses: settings outside `resume_whitelist` are listed and rejected (exit 2),
whitelisted ones (a larger trainer.max_steps) are accepted, and the wandb run continues under the same id. A run
directory written before a setting existed (an FSDP run before trainer.wrap_blocks) is compared as the behaviour it
had, not as a change."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from reliability_helpers import check_ok, env_for, metrics_by_step, only_run_dir, run_cli, small_dit


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_refuses_other_settings_accepts_whitelisted_ones_and_keeps_the_wandb_run(tmp_path, cli_env, dataset,
                                                                                       tiny_vae_dir):
    out = tmp_path / "out"
    env = env_for(cli_env, out)
    args = [*small_dit(tiny_vae_dir), "logger=wandb", "trainer.max_steps=3", "checkpoint.every_n_steps=2"]
    check_ok(run_cli(args, tmp_path, env))
    run_dir = only_run_dir(out, "dit_b1")
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id
    done = json.loads((run_dir / "DONE.json").read_text())
    assert done["global_step"] == 3
    config_before = (run_dir / "config.yaml").read_text()
    # the final step (3, not a multiple of the save interval) is checkpointed, mid-epoch: the data position is the
    # one after step 3, not the start of the next epoch
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 3
    assert (final["FramePackDataModule"]["epoch"], final["FramePackDataModule"]["consumed"]) == (0, 3)

    # not on the whitelist: one line per difference, exit 2, nothing run, nothing changed
    for override, line in (("data.num_frames=9", "data.num_frames: 5 -> 9"),
                           ("model.attention=spatial_temporal", "model.attention: 'full' -> 'spatial_temporal'")):
        refused = run_cli([*args, override, f"resume={run_dir}"], tmp_path, env)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("cogvx-train: error:")]
        assert any("resume would change settings" in ln for ln in errors), refused.stderr[-3000:]
        assert any(ln.strip().endswith(line) for ln in errors), refused.stderr[-3000:]
        assert sum("->" in ln for ln in errors) == 1, errors  # only the one setting that differs
    assert (run_dir / "config.yaml").read_text() == config_before
    assert json.loads((run_dir / "DONE.json").read_text())["global_step"] == 3

    # on the whitelist: a longer run continues to its new end, in the same directory and the same wandb run
    longer = run_cli([*args, "trainer.max_steps=5", f"resume={run_dir}"], tmp_path, env)
    check_ok(longer)
    assert "resume: allowed change trainer.max_steps: 3 -> 5" in longer.stderr + longer.stdout
    assert only_run_dir(out, "dit_b1") == run_dir
    assert json.loads((run_dir / "DONE.json").read_text())["global_step"] == 5
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (final["FramePackDataModule"]["epoch"], final["FramePackDataModule"]["consumed"]) == (0, 5)
    steps = metrics_by_step(run_dir)
    assert sorted(steps) == [0, 1, 2, 3, 4]
    assert all("train/loss" in steps[s] for s in steps)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline), offline
    assert (run_dir / "command.txt").read_text().count("resume=") == 1  # the refused launches left no trace


def test_a_saved_fsdp_config_without_wrap_blocks_counts_as_the_whole_dit_as_one_unit(cache_dir):
    """FSDP runs written before trainer.wrap_blocks wrapped the whole DiT as one unit (wrap_blocks=false)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cogvx_train.config import resolvers
    from cogvx_train.train.resume import config_changes

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        configs = {extra: OmegaConf.to_container(compose(config_name="train", overrides=[
            "stage=dit_b1", "experiment=demo", *extra.split()]), resolve=True)
            for extra in ("trainer=fsdp", "trainer=fsdp trainer.wrap_blocks=false", "trainer=ddp")}
    old = copy.deepcopy(configs["trainer=fsdp"])
    del old["trainer"]["wrap_blocks"], old["trainer"]["cpu_offload"]  # config.yaml of a run from before the settings
    whitelist = configs["trainer=fsdp"]["resume_whitelist"]
    assert "trainer.wrap_blocks" in whitelist and "trainer.cpu_offload" in whitelist
    assert config_changes(old, configs["trainer=fsdp trainer.wrap_blocks=false"], whitelist) == ([], [])
    # the default now (one unit per block) is a change, allowed: the checkpoint reads into either wrapping
    assert config_changes(old, configs["trainer=fsdp"], whitelist) == (["trainer.wrap_blocks: False -> True"], [])
    assert config_changes(old, configs["trainer=fsdp"], []) == ([], ["trainer.wrap_blocks: False -> True"])
    # only FSDP runs get the old behaviour filled in
    allowed, refused = config_changes(configs["trainer=ddp"], configs["trainer=fsdp"], whitelist)
    assert "trainer.wrap_blocks: '<unset>' -> True" in allowed and "trainer.strategy: 'ddp' -> 'fsdp'" in refused
    assert "trainer.cpu_offload: '<unset>' -> False" in allowed


def test_resuming_a_run_of_another_stage_names_the_stage(tmp_path, cache_dir):
    """A vae_a1 run given to `stage=dit_b1 resume=...` is one sentence naming the stage, not a list of every
    setting the two stages differ in."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cogvx_train.config import ConfigError, resolvers
    from cogvx_train.train.resume import resume_checkpoint_path
    from cogvx_train.train.run_dir import RunDirectory

    resolvers.register()
    run = RunDirectory(tmp_path / "vae-run")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "last.ckpt").write_bytes(b"")
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        saved = compose(config_name="train", overrides=["stage=vae_a1", "experiment=demo"])
        current = compose(config_name="train", overrides=["stage=dit_b1", "experiment=demo", f"resume={run.path}"])
    OmegaConf.save(saved, run.path / "config.yaml")
    with pytest.raises(ConfigError) as info:
        resume_checkpoint_path(current, run)
    assert str(info.value) == (f"resume={run.path} is a vae_a1 run, but this launch is stage=dit_b1; resume it with "
                               "stage=vae_a1, or start a dit_b1 run from its weights with init_from=.")

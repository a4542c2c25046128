"""`stage=curriculum_*` runs its stages in order, each from the previous stage's final EMA weights, and survives a
kill: the same command again skips finished stages and resumes the interrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from reliability_helpers import (
    SMALL,
    SMALL_VAE,
    check_ok,
    env_for,
    kill_when,
    metrics_by_step,
    run_cli,
    start_cli,
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dit_curriculum_chains_stages_and_resumes_after_a_kill(tmp_path, cli_env, dataset, tiny_vae_dir):
    out = tmp_path / "out"
    env = env_for(cli_env, out)
    args = ["stage=curriculum_dit", "curriculum.stages=[dit_b1,dit_b2]", *SMALL, f"model.vae.weights={tiny_vae_dir}",
            "trainer.max_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last_k=4"]
    root = out / "curricula" / "curriculum_dit"
    b1, b2 = root / "0_dit_b1", root / "1_dit_b2"

    # first launch: killed during stage 2, after its first checkpoint
    proc = start_cli(args, tmp_path, env, tmp_path / "first.log")
    # after the step's metrics row too, so that the kill lands past the catch-up window (tests/reliability/
    # test_catch_up.py covers a kill inside it)
    kill_when(proc, lambda: (b2 / "checkpoints" / "step-00000001.ckpt").exists()
              and (b2 / "checkpoints" / "last.ckpt").exists() and _logged_step(b2, 0),
              what="the first checkpoint of stage 2")
    assert (b1 / "DONE.json").exists() and not (b2 / "DONE.json").exists()
    b1_last = b1 / "checkpoints" / "last.ckpt"
    b1_mtime = b1_last.stat().st_mtime_ns

    # the same command again: stage 1 is skipped, stage 2 continues from its checkpoint
    again = run_cli(args, tmp_path, env)
    check_ok(again)
    log = again.stdout + again.stderr
    assert "curriculum: dit_b1 already finished" in log and "curriculum: resuming dit_b2" in log, log[-3000:]
    assert b1_last.stat().st_mtime_ns == b1_mtime
    assert json.loads((b2 / "DONE.json").read_text())["global_step"] == 4
    assert sorted(metrics_by_step(b2)) == [0, 1, 2, 3]

    # stage 2 started from stage 1's final EMA weights: its EMA after one update is d * start + (1 - d) * W1, with
    # d = min(decay, 1 / 10) on a fresh EMA's first update (the warm-up, see train/ema.py)
    first = torch.load(b1_last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 4
    start = first["dit_ema"]["shadow"]
    step1 = torch.load(b2 / "checkpoints" / "step-00000001.ckpt", map_location="cpu", weights_only=False)
    decay = min(step1["dit_ema"]["decay"], 1 / 10) if step1["dit_ema"].get("warmup") else step1["dit_ema"]["decay"]
    live_b1 = {k[len("dit."):]: v for k, v in first["state_dict"].items() if k.startswith("dit.")}
    far_from_live = 0
    for name, ema in step1["dit_ema"]["shadow"].items():
        w1 = step1["state_dict"][f"dit.{name}"]
        recovered = (ema - (1 - decay) * w1) / decay
        torch.testing.assert_close(recovered, start[name], rtol=0, atol=1e-4)  # /d amplifies float32 rounding
        far_from_live += not torch.allclose(recovered, live_b1[name], rtol=0, atol=1e-5)
    assert far_from_live > 0, "stage 1's EMA and live weights do not differ: the check above would not tell them apart"
    assert str(b1_last) in (b2 / "config.yaml").read_text()  # init_from, recorded in the stage's config


def _logged_step(run_dir, step: int) -> bool:
    try:
        return step in metrics_by_step(run_dir)
    except (OSError, ValueError, KeyError, AssertionError):  # not there yet, or a row being written
        return False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vae_curriculum_runs_a1_then_a2_without_context_parallelism(tmp_path, cli_env, dataset):
    out = tmp_path / "out"
    env = env_for(cli_env, out)
    vae_args = [a for a in SMALL_VAE if not a.startswith("stage=")]
    args = ["stage=curriculum_vae", *vae_args, "trainer.max_steps=2", "checkpoint.every_n_steps=2",
            "++context_parallel_size=1", "vae_loss.disc_start=1"]
    check_ok(run_cli(args, tmp_path, env))
    root = out / "curricula" / "curriculum_vae"
    a1, a2 = root / "0_vae_a1", root / "1_vae_a2"
    for stage in (a1, a2):
        assert json.loads((stage / "DONE.json").read_text())["global_step"] == 2
    assert f"init_from: {a1 / 'checkpoints' / 'last.ckpt'}" in (a2 / "config.yaml").read_text()
    assert "train/d_loss" in metrics_by_step(a2)[1]  # G and D train in A2 too (disc_start=1 goes to every stage)

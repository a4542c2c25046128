"""`cogvx-train -m ...`: one directory per trial, summary.csv / summary.md at the end, and the same command again
redoes no finished trial."""

from __future__ import annotations

import csv
import json
import time

import pytest
from reliability_helpers import SMALL, check_ok, env_for, run_cli

from cogvx_train.config.resolvers import trial_name


def test_trial_names_stay_apart_when_cut_to_length():
    common = "data.manifest=/" + "x" * 300
    a, b = trial_name(f"{common},seed=1"), trial_name(f"{common},seed=2")
    assert a != b and len(a) <= 200 and len(b) <= 200
    assert trial_name("model.attention=full,seed=1") == "model.attention=full,seed=1"
    assert trial_name("data.resolutions=[[32,32]]") == "data.resolutions=__32,32__"
    assert trial_name("") == "default"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_runs_each_trial_in_its_own_directory_writes_a_summary_and_skips_finished_trials(
        tmp_path, cli_env, dataset, tiny_vae_dir):
    out = tmp_path / "out"
    env = env_for(cli_env, out)
    args = ["-m", "stage=dit_b1", *SMALL, f"model.vae.weights={tiny_vae_dir}", "trainer.max_steps=2",
            "checkpoint.every_n_steps=2", "model.attention=full,spatial_temporal"]
    first = run_cli(args, tmp_path, env, timeout=400)
    check_ok(first)
    sweep = out / "sweeps" / "dit_b1"
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(trials) == 2, trials
    attention = {}
    for trial in trials:
        done = json.loads((trial / "DONE.json").read_text())
        assert done["global_step"] == 2 and "train/loss" in done
        assert (trial / "checkpoints" / "last.ckpt").exists() and (trial / "metrics.csv").exists()
        config = (trial / "config.yaml").read_text()
        attention[trial.name] = next(ln.split(":", 1)[1].strip() for ln in config.splitlines()
                                     if ln.strip().startswith("attention:"))
        assert f"model.attention={attention[trial.name]}" in trial.name
    assert sorted(attention.values()) == ["full", "spatial_temporal"]

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == [t.name for t in trials]
    assert all(r["status"] == "finished" and r["global_step"] == "2" and r["train/loss"] for r in rows)
    table = (sweep / "summary.md").read_text()
    assert table.startswith("| trial | status | train/loss") and table.count("| finished |") == 2

    # the same command again: nothing is trained again, the summary is rewritten
    stamps = {t.name: (t / "DONE.json").stat().st_mtime_ns for t in trials}
    ckpt_stamps = {t.name: (t / "checkpoints" / "last.ckpt").stat().st_mtime_ns for t in trials}
    before = time.monotonic()
    second = run_cli(args, tmp_path, env, timeout=400)
    check_ok(second)
    assert second.stdout.count("already finished; skipping") + second.stderr.count("already finished; skipping") == 2
    assert {t.name: (t / "DONE.json").stat().st_mtime_ns for t in trials} == stamps
    assert {t.name: (t / "checkpoints" / "last.ckpt").stat().st_mtime_ns for t in trials} == ckpt_stamps
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 2
    assert (sweep / "summary.md").stat().st_mtime_ns > max(stamps.values())
    assert time.monotonic() - before < 120

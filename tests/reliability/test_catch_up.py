"""A SIGKILL in the windows Lightning leaves between a checkpoint and the metrics of its own step: right after the
step-N checkpoint is written (before step N's training row is logged) and during the validation that follows
it. The resumed run catches up (cogvx_train/train/catch_up.py): metrics.csv ends up with every row of the run
that was never interrupted, the same values, no duplicates.

The kill comes from inside the run, at the exact point: the wrapper below patches the training module's hook
that Lightning calls after the callbacks' on_train_batch_end (where the checkpoint is saved), or validation's
epoch end, to SIGKILL its own process there; everything else is the real `cogvx-train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    SMALL_VAE,
    check_ok,
    checkpoint_step,
    deterministic_columns,
    env_for,
    metrics_by_step,
    only_run_dir,
    run_cli,
    small_dit,
)

KILL_STEP, MAX_STEPS = 4, 6
CADENCE = ["checkpoint.every_n_steps=2", "checkpoint.keep_last_k=5", "trainer.val_check_interval=2",
           "trainer.limit_val_batches=1", f"trainer.max_steps={MAX_STEPS}"]

KILLER = """
import os, signal, sys
from cogvx_train.cli.train import main
from cogvx_train.dit.module import DiTTrainingModule
from cogvx_train.vae.module import VAETrainingModule

step, hook = int(os.environ["KILL_STEP"]), os.environ["KILL_IN"]
for cls in (DiTTrainingModule, VAETrainingModule):
    original = getattr(cls, hook)
    def killing(self, *args, _original=original, **kwargs):
        _original(self, *args, **kwargs)
        if self.global_step == step and not self.trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)
    setattr(cls, hook, killing)
sys.exit(main())
"""


def _args(kind: str, vae_dir: Path) -> list[str]:
    base = small_dit(vae_dir) if kind == "dit" else [*SMALL_VAE, "vae_loss.disc_start=3"]
    return [*base, *CADENCE]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind, hook, kill_step", [
    ("dit", "on_train_batch_end", KILL_STEP), ("dit", "on_validation_epoch_end", KILL_STEP),
    ("vae", "on_train_batch_end", KILL_STEP),
    # the final step: the resumed fit has nothing left to train (Lightning skips it), the catch-up runs after it
    ("dit", "on_validation_epoch_end", MAX_STEPS)])
def test_a_kill_between_a_checkpoint_and_its_rows_loses_no_row(kind, hook, kill_step, tmp_path, cli_env, dataset,
                                                                 tiny_vae_dir):
    args = _args(kind, tiny_vae_dir)
    stage = "dit_b1" if kind == "dit" else "vae_a1"
    check_ok(run_cli(args, tmp_path, env_for(cli_env, tmp_path / "ref")))
    ref = metrics_by_step(only_run_dir(tmp_path / "ref", stage))

    out = tmp_path / "killed"
    env = {**env_for(cli_env, out), "KILL_STEP": str(kill_step), "KILL_IN": hook}
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(killer), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, f"exit {killed.returncode}\n{killed.stderr[-3000:]}"
    run_dir = only_run_dir(out, stage)
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == kill_step
    assert not (run_dir / "DONE.json").exists()
    lost = metrics_by_step(run_dir)
    label = kill_step - 1  # Lightning labels the rows of the step that ends at global step N with N - 1
    if hook == "on_train_batch_end":  # the checkpoint is on disk, its step's training row is not
        assert "train/loss" not in lost.get(label, {}) and "train/loss" in ref[label]
    else:  # the training row is there, the validation after it is not
        assert "train/loss" in lost[label] and "val/loss" not in lost[label] and "val/loss" in ref[label]

    resumed = run_cli([*args, f"resume={run_dir}"], tmp_path, env_for(cli_env, out))
    check_ok(resumed)
    log = resumed.stdout + resumed.stderr
    what = "never logged step" if hook == "on_train_batch_end" else "did not finish the validation after step"
    assert f"resume: the killed launch {what} {label}" in log, log[-3000:]

    got = metrics_by_step(run_dir)  # fails on a step whose column was logged twice with different values
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        want, have = deterministic_columns(ref[step]), deterministic_columns(got[step])
        # a replayed training row lacks only what the module logs after the checkpoint (its throughput, perf/*)
        assert have == want, f"step {step}: " + ", ".join(
            f"{k}: {want.get(k)} != {have.get(k)}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
    a = torch.load(only_run_dir(tmp_path / "ref", stage) / "checkpoints" / "last.ckpt", map_location="cpu",
                   weights_only=False)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # the run is finished, with the final metrics an uninterrupted run records
    done = json.loads((run_dir / "DONE.json").read_text())
    ref_done = json.loads((only_run_dir(tmp_path / "ref", stage) / "DONE.json").read_text())
    assert done["global_step"] == ref_done["global_step"] == MAX_STEPS
    want, have = deterministic_columns(ref_done), deterministic_columns(done)
    assert sorted(have) == sorted(want)
    assert have == pytest.approx(want, rel=1e-6, nan_ok=True)  # nan: a timestep bucket no step sampled


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_uninterrupted_resume_replays_nothing(tmp_path, cli_env, dataset, tiny_vae_dir):
    """A launch that ends normally, resumed for more steps: every row of the checkpoint's step is there already."""
    args = [a for a in _args("dit", tiny_vae_dir) if not a.startswith("trainer.max_steps")]
    out = tmp_path / "out"
    check_ok(run_cli([*args, "trainer.max_steps=4"], tmp_path, env_for(cli_env, out)))
    run_dir = only_run_dir(out, "dit_b1")
    before = metrics_by_step(run_dir)
    resumed = run_cli([*args, "trainer.max_steps=6", f"resume={run_dir}"], tmp_path, env_for(cli_env, out))
    check_ok(resumed)
    assert "resume: the killed launch" not in resumed.stdout + resumed.stderr
    after = metrics_by_step(run_dir)
    assert all(after[s] == row for s, row in before.items()) and max(after) == 5

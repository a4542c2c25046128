"""A run SIGKILLed mid-training and resumed with `resume=<run dir>` logs the same numbers, step for step and bit for
bit (CPU), as the same run never interrupted; its final weights, EMA and optimizer states are identical too.

The DiT's per-timestep-bucket losses (train/loss_tAAA-BBB) average over the last log_every_n_steps steps; with a
row every 3 steps and checkpoints every 4, the first row after the resume averages steps from before it, so the
window has to come back from the checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    SMALL_VAE,
    check_ok,
    checkpoint_step,
    deterministic_columns,
    env_for,
    flat_tensors,
    kill_when,
    metrics_by_step,
    only_run_dir,
    run_cli,
    small_dit,
    start_cli,
)

KILL_AFTER = 4  # kill once the step-4 checkpoint exists and the killed launch has logged a row past it
# log_every_n_steps -> (checkpoint every, max steps): a row every step, or every 3 steps, a window straddling resumes
CADENCE = {1: (2, 8), 3: (4, 10)}


def _logged_steps(run_dir: Path) -> set[int]:
    """Steps in metrics.csv right now (the file is being appended to: a torn last line is ignored)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            return {int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")}
    except (OSError, ValueError, KeyError):
        return set()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind, workers, log_every", [("dit", 0, 1), ("dit", 1, 1), ("dit", 0, 3), ("vae", 0, 1),
                                                      ("vae", 1, 1)])
def test_killed_and_resumed_run_matches_the_uninterrupted_run(kind, workers, log_every, tmp_path, cli_env, dataset,
                                                              tiny_vae_dir):
    # VAE: G and D both train, and a validation runs right after the checkpoint the run resumes from (it draws
    # from the global generator, which the posterior sampling of the training steps also uses)
    base = small_dit(tiny_vae_dir) if kind == "dit" else [
        *SMALL_VAE, "vae_loss.disc_start=3", f"trainer.val_check_interval={KILL_AFTER}", "trainer.limit_val_batches=1"]
    stage = "dit_b1" if kind == "dit" else "vae_a1"
    every, max_steps = CADENCE[log_every]
    args = [*(a for a in base if not a.startswith("trainer.log_every_n_steps=")), f"data.num_workers={workers}",
            f"trainer.log_every_n_steps={log_every}", f"trainer.max_steps={max_steps}",
            f"checkpoint.every_n_steps={every}", "checkpoint.keep_last_k=10"]
    logged = [s for s in range(max_steps) if (s + 1) % log_every == 0]  # the steps with training rows

    # the reference: never interrupted
    ref_out = tmp_path / "ref"
    check_ok(run_cli(args, tmp_path, env_for(cli_env, ref_out)))
    ref_dir = only_run_dir(ref_out, stage)

    # the same run, killed between two checkpoints after it logged a row past the first of them
    out = tmp_path / "killed"
    env = env_for(cli_env, out)
    proc = start_cli(args, tmp_path, env, tmp_path / "killed.log")

    def past_checkpoint() -> bool:
        runs = list((out / "runs" / stage).glob("*")) if (out / "runs" / stage).is_dir() else []
        if not runs:
            return False
        ckpts = runs[0] / "checkpoints"
        step_ckpt, last = ckpts / f"step-{KILL_AFTER:08d}.ckpt", ckpts / "last.ckpt"
        return (step_ckpt.exists() and last.exists() and last.stat().st_mtime_ns >= step_ckpt.stat().st_mtime_ns
                and max(_logged_steps(runs[0]), default=-1) >= KILL_AFTER)

    kill_when(proc, past_checkpoint, what=f"the step-{KILL_AFTER} checkpoint and a row past it")
    run_dir = only_run_dir(out, stage)
    assert not (run_dir / "DONE.json").exists()
    resume_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert KILL_AFTER <= resume_step < max_steps
    before = _logged_steps(run_dir)
    killed_rows_past_checkpoint = {s for s in before if s >= resume_step}

    resumed = run_cli([*args, f"resume={run_dir}"], tmp_path, env)
    check_ok(resumed)
    assert (run_dir / "DONE.json").exists()

    ref, got = metrics_by_step(ref_dir), metrics_by_step(run_dir)  # metrics_by_step fails on duplicated steps
    # (a fresh run may also validate at step 0: that row is compared like any other)
    assert sorted(got) == sorted(ref) and set(logged) <= set(ref), (sorted(ref), logged)
    compared = 0
    for step in sorted(ref):
        want, have = deterministic_columns(ref[step]), deterministic_columns(got[step])
        assert have == want, f"step {step} (resumed from {resume_step}): " + ", ".join(
            f"{k}: {want.get(k)} != {have.get(k)}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
        compared += step >= resume_step and "train/loss" in have
    assert compared == sum(s >= resume_step for s in logged) > 0
    if kind == "dit":  # bucket losses are among the columns compared, and one row's window straddles the resume
        assert any(k.startswith("train/loss_t") for k in ref[logged[-1]])
        assert log_every == 1 or any(resume_step <= s < resume_step + log_every - 1 for s in logged)
    if kind == "vae":
        assert "train/d_loss" in got[max_steps - 1], "the discriminator must be training after the resume"
    # the killed launch had written rows past its checkpoint; the resumed launch replaced them (no duplicates)
    assert killed_rows_past_checkpoint, "the kill came too early to check the rows past the checkpoint"

    # final weights, EMA, both optimizers and schedulers: bit-identical
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == max_steps
    for key in ("state_dict", "optimizer_states", "vae_ema" if kind == "vae" else "dit_ema"):
        ta, tb = flat_tensors(a[key]), flat_tensors(b[key])
        assert ta.keys() == tb.keys() and ta, key
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"{key} differs after the resume: {diff[:5]}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert not list((run_dir / "checkpoints").glob("*-v*.ckpt")), "re-saved steps must replace their files"

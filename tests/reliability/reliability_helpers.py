"""Shared by tests/reliability: run the real `cogvx-train` in a subprocess, kill it at a chosen moment, read the
run directory back (metrics.csv by step, checkpoints)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent / "cogvx-train"

# The smallest runs the stages accept: 32x32 clips of 5 frames, 2 per batch, a row in metrics.csv every step,
# no validation inside the run.
SMALL = ["experiment=demo", "data.batch_size=2", "data.resolutions=[[32,32]]", "data.num_frames=5",
         "data.num_workers=0", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000",
         "optim.warmup_steps=2", "callbacks.progress_bar=false"]
# VAE: a tiny discriminator, LPIPS on one frame per clip ("++": set whether or not the config has the key)
SMALL_VAE = ["stage=vae_a1", *SMALL, "++vae_loss.disc_size=tiny", "vae_loss.lpips_frames=1"]


def small_dit(vae_dir: Path) -> list[str]:
    """DiT stage B1 on a frozen tiny VAE (no demo VAE is trained)."""
    return ["stage=dit_b1", *SMALL, f"model.vae.weights={vae_dir}"]


def env_for(base: dict[str, str], out_dir: Path) -> dict[str, str]:
    env = dict(base)
    env.update(COGVX_OUTPUT_DIR=str(out_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return out


def check_ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-4000:]}"


def only_run_dir(out_dir: Path, stage: str) -> Path:
    runs = sorted((out_dir / "runs" / stage).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def start_cli(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([str(BIN), *args], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300, what: str = "") -> None:
    """SIGKILL the process (and its workers) as soon as `ready()` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_by_step(run_dir: Path) -> dict[int, dict[str, str]]:
    """metrics.csv merged by step (Lightning writes several rows per step: train metrics, lr monitor, ...).
    A step whose column appears twice with different values (duplicate rows from two launches) fails."""
    out: dict[int, dict[str, str]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            merged = out.setdefault(int(float(row["step"])), {})
            for key, value in row.items():
                if value in ("", None) or key == "step":
                    continue
                assert merged.get(key, value) == value, f"step {row['step']}: {key} logged twice ({merged[key]}, {value})"
                merged[key] = value
    return out


def deterministic_columns(row: dict[str, str]) -> dict[str, str]:
    """Everything but wall-clock measurements."""
    return {k: v for k, v in row.items() if not k.startswith("perf/") and k not in ("train/tokens_per_s", "train/mfu")}


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out

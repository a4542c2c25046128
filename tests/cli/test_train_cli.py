"""The real `cogvx-train` console script, run from a directory outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "cogvx-train"


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_stages_and_groups(tmp_path, cli_env):
    out = run(["--help"], tmp_path, cli_env)
    assert out.returncode == 0, out.stderr
    for word in ("vae_a1", "vae_a2", "dit_b1", "dit_b4", "model:", "trainer:", "logger:", "experiment:", "debug:"):
        assert word in out.stdout


def test_cfg_job_prints_the_resolved_config(tmp_path, cli_env):
    out = run(["stage=dit_b1", "experiment=demo", "--cfg", "job"], tmp_path, cli_env)
    assert out.returncode == 0, out.stderr
    assert "stage_name: dit_b1" in out.stdout
    assert "${" not in out.stdout                       # resolved, not interpolations
    assert f"output_dir: {cli_env['COGVX_OUTPUT_DIR']}" in out.stdout
    assert not (tmp_path / "outputs").exists()           # printing a config runs nothing


NOT_A_RUN = "/nonexistent/path"


@pytest.mark.parametrize("args, expected", [
    (["stage=dit_b9"], "stage=dit_b9 is not a known stage"),
    (["model=tiny"], "no stage is selected"),
    (["stage=vae_a1", "model=7b"], "model=7b is not a known model"),
    (["stage=vae_a1", "data.num_frame=17"], "Did you mean data.num_frames?"),
    (["stage=vae_a1", "experiment=demo", "data.num_frames=48"], "is not of the form 4k+1"),
    (["stage=vae_a1", "experiment=demo", "data.resolutions=[[250,384]]"], "is not a multiple of 16 (8x VAE downsampling times the 2x2 patches); use [256, 384]"),
    (["stage=vae_a1", "experiment=demo", "data.batch_size=0"], "data.batch_size=0 must be an integer > 0"),
    (["stage=vae_a1", "experiment=demo", f"data.manifest={NOT_A_RUN}/m.jsonl"], "does not exist"),
    (["stage=dit_b2", "experiment=demo"], "add init_from="),
    (["stage=dit_b1", "experiment=demo", f"init_from={NOT_A_RUN}.ckpt"], "init_from=/nonexistent/path.ckpt does not exist"),
    (["stage=dit_b1", "experiment=demo", "model.attention=sparse"], "model.attention='sparse' is not one of"),
    (["stage=dit_b1", "experiment=demo", "diffusion.timestep_sampling=lognormal"], "is not one of uniform_per_rank, iid"),
    (["stage=vae_a1", "experiment=demo", "trainer=deepspeed_zero2"], "use trainer=ddp for vae"),
    (["stage=vae_a1", "experiment=demo", "trainer=fsdp"], "trainer=fsdp trains the DiT stages"),
    (["stage=dit_b1", "model=2b", "model.vae.weights=null"], "model.text_encoder.path is not set"),
    (["stage=vae_a1", "experiment=demo", "optim.lr=-1"], "optim.lr=-1 must be a number > 0"),
    (["stage=vae_a1", "experiment=demo", "model.vae.scaling_factor=0"], "model.vae.scaling_factor=0 must be a number > 0, or null"),
    (["stage=vae_a1", "experiment=demo", "trainer.accumulate_grad_batches=4"], "does not apply to VAE stages"),
    (["stage=dit_b1", "experiment=demo", "trainer.accumulate_grad_batches=0"], "must be an integer > 0"),
    (["stage=vae_a1", "experiment=demo", f"resume={NOT_A_RUN}"], "resume=/nonexistent/path does not exist"),
])
def test_wrong_config_gets_one_clear_line(tmp_path, cli_env, args, expected):
    out = run(args, tmp_path, cli_env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("cogvx-train: error:")]
    assert lines and any(expected in ln for ln in lines), out.stderr[-2000:]


def test_hydra_run_dir_is_pinned_for_the_ranks_lightning_launches():
    """trainer.devices=N without torchrun: Lightning starts ranks 1.. with `hydra.run.dir=<HydraConfig run.dir>`,
    read when it launches them. That value is a time-stamp interpolation; unpinned, it named a new directory a
    second later (a near-empty second run directory per launch)."""
    import time

    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd

    from cogvx_train.cli.train import pin_hydra_run_dir
    from cogvx_train.config import resolvers

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["stage=vae_a1", "paths.output_dir=/tmp/pin-test"],
                      return_hydra_config=True)
        cfg.hydra.runtime.cwd = str(Path.cwd())
        HydraConfig.instance().set_config(cfg)
        first = HydraConfig.get().run.dir
        time.sleep(1.1)
        assert HydraConfig.get().run.dir != first  # the problem: every read is a new time stamp
        pin_hydra_run_dir(Path(first))
        time.sleep(1.1)
        command, _ = _hydra_subprocess_cmd(local_rank=1)
        assert f'hydra.run.dir="{first}"' in command

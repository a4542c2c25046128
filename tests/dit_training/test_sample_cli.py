"""`cogvx-sample` on a checkpoint trained in the test: run as a subprocess it writes the same videos validation
wrote for the same prompts and step (one sampling code path, EMA weights); --no-ema, defaults and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dit_helpers import loader, module_kwargs, trainer, video_batch
from lightning.pytorch.callbacks import ModelCheckpoint

from cogvx_train.cli.sample import main
from cogvx_train.dit.module import DiTTrainingModule

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step dit run with a real (saved) tiny VAE, its last.ckpt and the validation samples of step 2."""
    from cogvx_train.vae import build_vae, export_diffusers_vae

    root = tmp_path_factory.mktemp("dit-run")
    torch.manual_seed(0)
    vae_dir = export_diffusers_vae(build_vae("tiny", scaling_factor=0.5), root / "vae")
    module = DiTTrainingModule(**module_kwargs(
        vae={"size": "tiny", "weights": str(vae_dir), "scaling_factor": 0.5}, samples_dir=str(root / "samples"),
        sampling={"num_steps": 2, "guidance_scale": 3.0, "prompts": PROMPTS, "seed": 7, "fps": 4.0}))
    fit = trainer(2, callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
                  enable_checkpointing=True, val_check_interval=2, limit_val_batches=1, check_val_every_n_epoch=None)
    fit.fit(module, train_dataloaders=loader(video_batch()), val_dataloaders=loader(video_batch(seed=4), length=1))
    return root


def test_cli_subprocess_reproduces_the_validation_samples(run_dir, tmp_path):
    out = tmp_path / "out"
    script = Path(sys.executable).parent / "cogvx-sample"  # the installed console script
    assert script.exists(), "install the package (pip install -e .) so that cogvx-sample exists"
    cmd = [str(script), "--checkpoint", str(run_dir), "--out", str(out),
           "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.name for p in out.glob("*.mp4"))
    assert written == ["00_a_red_circle.mp4", "01_a_blue_square.mp4"]
    for i, name in enumerate(written):  # same weights (EMA), seed, steps, guidance, shape and code as validation
        assert (out / name).read_bytes() == (run_dir / "samples" / f"step0000002_{i}.mp4").read_bytes()
    info = json.loads((out / "samples.json").read_text())
    assert info["settings"] == {"num_frames": 5, "height": 16, "width": 16, "num_steps": 2, "guidance_scale": 3.0,
                                "guidance_schedule": "constant", "seed": 7, "fps": 4.0}
    assert info["weights"].startswith("EMA of ")


def test_no_ema_other_settings_and_prompts_file(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n")
    args = ["--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--prompts-file", str(prompts)]
    assert main(args + ["--out", str(tmp_path / "ema")]) == 0
    assert main(args + ["--out", str(tmp_path / "live"), "--no-ema"]) == 0
    assert main(args + ["--out", str(tmp_path / "big"), "--num-frames", "9", "--width", "32", "--steps", "3",
                        "--guidance-schedule", "dynamic_cosine", "--seed", "1"]) == 0
    ema, live = (tmp_path / d / "00_a_red_circle.mp4" for d in ("ema", "live"))
    assert ema.read_bytes() != live.read_bytes()
    info = json.loads((tmp_path / "big" / "samples.json").read_text())["settings"]
    assert (info["num_frames"], info["width"], info["num_steps"], info["seed"]) == (9, 32, 3, 1)


def test_errors_are_one_line_with_exit_code_2(run_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path)]) == 2
    assert main(["--checkpoint", str(run_dir), "--prompt", "x", "--out", str(tmp_path), "--num-frames", "6"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cogvx-sample: error:")]
    assert len(lines) == 3 and "no prompt given" in lines[1] and "4k+1" in lines[2]


def test_export_loads_in_diffusers_and_as_init_from(run_dir, tmp_path):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from cogvx_train.dit.init_from import load_init_weights
    from cogvx_train.sampling import load_for_sampling

    module, _ = load_for_sampling(run_dir)  # EMA weights
    out = module.export(str(tmp_path / "export"))
    transformer = CogVideoXTransformer3DModel.from_pretrained(out / "transformer")
    assert transformer.config.num_layers == module.dit.config.num_layers
    vae = AutoencoderKLCogVideoX.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == 0.5
    scheduler = CogVideoXDDIMScheduler.from_pretrained(out / "scheduler")
    assert torch.allclose(scheduler.alphas_cumprod.double(), module.schedule.alphas_cumprod, atol=1e-6)
    fresh = DiTTrainingModule(**module_kwargs(use_latent_cache=True))
    load_init_weights(fresh, str(out))  # an export directory is a valid init_from
    assert all(torch.equal(v, module.dit.state_dict()[k]) for k, v in fresh.dit.state_dict().items())

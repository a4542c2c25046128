"""Bad input found by an audit of the console scripts: each gets one sentence (what is wrong, what would work) before
anything heavy is built. In-process through the real checks (validate(), the CLIs' main) with tiny stand-in files:
a checkpoint here only needs the weight names the checks read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from cogvx_train.config import ConfigError, resolvers
from cogvx_train.config.validate import validate

DIT = ["stage=dit_b1", "experiment=demo"]
VAE = ["stage=vae_a1", "experiment=demo"]


def load(overrides: list[str]):
    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def messages(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(load(overrides))
    return err.value.messages


def one_message(overrides: list[str], expected: str) -> str:
    found = [m for m in messages(overrides) if expected in m]
    assert len(found) == 1, messages(overrides)
    return found[0]


def lightning_ckpt(path: Path, *prefixes: str) -> Path:
    """A single-file checkpoint with weights under these module names (what a stage's LightningModule saves)."""
    torch.save({"state_dict": {f"{p}.conv.weight": torch.zeros(2) for p in prefixes}, "global_step": 3}, path)
    return path


def diffusers_dir(path: Path, class_name: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": class_name}))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return path


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    not_a_ckpt = tmp_path / "notes.ckpt"
    not_a_ckpt.write_text("hello\n")
    (tmp_path / "empty").mkdir()
    no_config = tmp_path / "weights_only"
    no_config.mkdir()
    (no_config / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return {
        "dit_ckpt": lightning_ckpt(tmp_path / "dit.ckpt", "dit"),
        "vae_ckpt": lightning_ckpt(tmp_path / "vae.ckpt", "vae", "discriminator"),
        "not_a_ckpt": not_a_ckpt,
        "empty": tmp_path / "empty",
        "no_config": no_config,
        "diffusers_vae": diffusers_dir(tmp_path / "vae_dir", "AutoencoderKLCogVideoX"),
        "diffusers_dit": diffusers_dir(tmp_path / "dit_dir", "CogVideoXTransformer3DModel"),
    }


# ------------------------------------------------------------------------------------ weights: init_from, VAE


def test_matching_weights_pass(files):
    validate(load(DIT + [f"init_from={files['dit_ckpt']}", f"model.vae.weights={files['vae_ckpt']}"]))
    validate(load(DIT + [f"init_from={files['diffusers_dit']}", f"model.vae.weights={files['diffusers_vae']}"]))
    validate(load(VAE + [f"init_from={files['vae_ckpt']}"]))


@pytest.mark.parametrize("stage, key, given, expected", [
    (DIT, "init_from", "vae_ckpt", "is a vae-stage checkpoint (VAE weights), not a dit-stage one; give a dit run"),
    (DIT, "init_from", "diffusers_vae", "is a diffusers VAE (AutoencoderKLCogVideoX), not a transformer; give"),
    (DIT, "init_from", "not_a_ckpt", "cannot be read as a checkpoint: it is not a PyTorch checkpoint; give"),
    (DIT, "init_from", "empty", "holds no transformer weights cogvx-train can read; give a dit run directory"),
    (VAE, "init_from", "dit_ckpt", "is a dit-stage checkpoint (transformer weights), not a vae-stage one; give a vae"),
    (DIT, "model.vae.weights", "dit_ckpt", "is a dit-stage checkpoint (transformer weights), not a vae-stage one"),
    (DIT, "model.vae.weights", "diffusers_dit", "is a diffusers transformer (CogVideoXTransformer3DModel), not a VAE"),
    (DIT, "model.vae.weights", "not_a_ckpt", "cannot be read as a checkpoint"),
    (DIT, "model.vae.weights", "no_config", "holds no VAE weights cogvx-train can read; give a vae run directory"),
])
def test_weights_of_the_wrong_kind(files, stage, key, given, expected):
    message = one_message(stage + [f"{key}={files[given]}"], expected)
    assert message.startswith(f"{key}={files[given]} ")


def test_a_resumed_run_ignores_init_from(files, tmp_path):
    """init_from is not read on resume (the run continues from its own checkpoint), so it is not judged either."""
    run = tmp_path / "run"
    run.mkdir()
    validate(load(DIT + [f"resume={run}", f"init_from={files['vae_ckpt']}"]))


# ------------------------------------------------------------------------------------------------- manifests


def write_manifest(path: Path, rows: list[dict], header: dict | None = None, extra: str = "") -> Path:
    header = header or {"schema": "cogvx-manifest", "version": 1}
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *rows]) + extra)
    return path


def video_rows(folder: Path, n: int, create: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        name = f"clips/clip_{i}.mp4"
        if create:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"")
        rows.append({"path": name, "kind": "video", "status": "ok", "caption": "a red circle", "num_frames": 17,
                     "fps": 8.0, "width": 64, "height": 64})
    return rows


def test_a_sound_manifest_passes(tmp_path):
    good = write_manifest(tmp_path / "m.jsonl", video_rows(tmp_path, 10))
    validate(load(VAE + [f"data.manifest={good}"]))


@pytest.mark.parametrize("content, expected", [
    ("", "is not a cogvx manifest: its first line must be a header"),
    ('{"path": "a.mp4", "caption": "x"}\n', "build one from the media folder with `cogvx-data manifest FOLDER"),
    ("HEADER\n{\"path\": \"a.mp4\", \"kind\": \"video\"\n", "m.jsonl:2 is not valid JSON"),
    ("HEADER\n[1, 2]\n", "m.jsonl:2 is not a row object"),
    ("HEADER\n", "has no usable rows (0 ok videos, 0 ok images, use_images=True)"),
])
def test_manifest_content_is_read_before_the_model_is_built(tmp_path, content, expected):
    header = json.dumps({"schema": "cogvx-manifest", "version": 1})
    path = tmp_path / "m.jsonl"
    path.write_text(content.replace("HEADER", header))
    message = one_message(VAE + [f"data.manifest={path}"], expected)
    assert message.startswith("data.manifest: ")


def test_manifest_moved_away_from_its_files(tmp_path):
    moved = write_manifest(tmp_path / "m.jsonl", video_rows(tmp_path, 10, create=False))
    message = one_message(VAE + [f"data.manifest={moved}"], "the first 8 of its usable files are missing (e.g. ")
    assert "keep the manifest next to its data" in message and "--absolute-paths" in message


def test_one_missing_file_is_left_to_the_failure_budget(tmp_path):
    """A few bad files are replaced at run time (data.max_failure_rate); only a manifest with none present fails."""
    rows = video_rows(tmp_path, 10)
    (tmp_path / rows[0]["path"]).unlink()
    validate(load(VAE + [f"data.manifest={write_manifest(tmp_path / 'm.jsonl', rows)}"]))


def test_val_manifest_and_holdout(tmp_path):
    good = write_manifest(tmp_path / "m.jsonl", video_rows(tmp_path, 3))
    one_message(VAE + [f"data.manifest={good}", "data.num_val_clips=3"],
                "data.manifest: holding out 3 validation clips would leave none of the 3 ok videos for training")
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = write_manifest(other / "val.jsonl", video_rows(other / "nowhere", 2, create=False))
    one_message(VAE + [f"data.manifest={good}", f"data.val_manifest={moved}"], "data.val_manifest: manifest ")


def test_manifest_that_is_a_folder(tmp_path):
    good = write_manifest(tmp_path / "data.jsonl", video_rows(tmp_path, 2))
    message = one_message(VAE + [f"data.manifest={tmp_path}"], "is a folder; give the manifest file itself")
    assert f"e.g. {good}" in message


def test_latent_cache_without_index(tmp_path, files):
    one_message(DIT + [f"data.latent_cache={files['empty']}"], "is not a finished latent cache (no index.json)")
    (files["empty"] / "index.json").write_text("{not json")
    one_message(DIT + [f"data.latent_cache={files['empty']}"], "is not a cogvx-latent-cache version <= 1 index")


# ------------------------------------------------------------------------------------------- plain values


@pytest.mark.parametrize("override, expected", [
    ("data.resolutions=[[32,32],[32,32]]", "data.resolutions lists [32, 32] more than once"),
    ("seed=abc", "seed='abc' must be an integer, e.g. 42."),
    ("trainer.devices=abc", "trainer.devices='abc' must be a number of devices per node"),
    ("trainer.devices=0", "trainer.devices=0 must be a number of devices per node"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0 must be an integer > 0."),
    ("data.use_images=maybe", "data.use_images='maybe' must be true or false."),
    ("data.num_val_clips=-1", "data.num_val_clips=-1 must be an integer ≥ 0."),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be a number of steps ≥ 1 (e.g. 1000)"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 must be a number of steps ≥ 1"),
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1 must be an integer ≥ 0."),
])
def test_values_lightning_would_reject_with_a_traceback(override, expected):
    one_message(VAE + [override], expected)


@pytest.mark.parametrize("override, expected", [
    ("model.text_encoder.max_length=0", "model.text_encoder.max_length=0 must be an integer > 0."),
    ("sampling.guidance_scale=-1", "sampling.guidance_scale=-1 must be a number ≥ 0 (1 = no guidance, 6 is the"),
    ("trainer=fsdp trainer.cpu_offload=gpu", "trainer.cpu_offload='gpu' must be true (FSDP keeps parameters and "
                                             "gradients on the CPU between uses) or false."),
])
def test_dit_values_found_only_when_built_or_at_the_first_validation(override, expected):
    one_message(DIT + override.split(), expected)


@pytest.mark.parametrize("devices", ["1", "auto", "-1", "[0,1]", "'0,1'"])
def test_device_forms_lightning_accepts(devices):
    validate(load(VAE + [f"trainer.devices={devices}"]))


def test_a_wrong_batch_size_is_one_sentence():
    """data.image_batch_size follows data.batch_size by default: one mistake, reported once."""
    found = messages(VAE + ["data.batch_size=-1"])
    assert found == ["data.batch_size=-1 must be an integer > 0."]
    assert messages(VAE + ["data.image_batch_size=0"]) == ["data.image_batch_size=0 must be an integer > 0."]


def test_a_batch_larger_than_the_data_is_a_config_error():
    """Found only once the buckets exist (in the fit): a ConfigError, which the CLI prints as one line."""
    from cogvx_train.data.frame_pack import Bucket, BucketBatchSampler

    with pytest.raises(ConfigError, match="no complete batch can be formed.*lower batch_size"):
        BucketBatchSampler([0] * 5, [Bucket(32, 32, 5, False, 8)])


# ------------------------------------------------------------------------------------ cogvx-train resume=


def test_resume_of_a_folder_that_is_no_run_leaves_it_alone(tmp_path, cli_env):
    """resume=<folder without config.yaml> is refused before Hydra writes .hydra/ and train.log into it (and the
    rejected launch once deleted the folder again, with whatever it held)."""
    mine = tmp_path / "my_folder"
    mine.mkdir()
    stray = tmp_path / "model.ckpt"
    lightning_ckpt(stray, "vae")
    for target, run_dir in ((mine, mine), (stray, tmp_path)):
        out = subprocess.run([str(Path(sys.executable).parent / "cogvx-train"), *VAE, f"resume={target}"],
                             cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"cogvx-train: error: resume={target} is not a cogvx-train run ({run_dir} has no config.yaml)" \
            in out.stderr
        assert mine.is_dir() and not (run_dir / ".hydra").exists() and not (run_dir / "train.log").exists()


# -------------------------------------------------------------------------------------------- cogvx-sample


@pytest.fixture()
def sample_main(monkeypatch):
    """cogvx-sample's main, failing the test if it ever gets as far as loading the checkpoint."""
    import cogvx_train.sampling as sampling
    from cogvx_train.cli.sample import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(sampling, "load_for_sampling", must_not_load)
    return main


@pytest.mark.parametrize("extra, expected", [
    (["--steps", "0"], "--steps 0 must be at least 1 (50 is the released setting)."),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1."),
    (["--fps", "-1"], "--fps -1.0 must be a frame rate > 0, e.g. 8."),
    (["--num-frames", "48"], "--num-frames=48 is not of the form 4k+1"),
    (["--height", "30"], "--height 30 must be a positive multiple of 16"),
    (["--guidance-scale", "-2"], "--guidance-scale -2.0 must be >= 0"),
    (["--device", "tpu"], "--device tpu is not a torch device; use cuda, cuda:N or cpu."),
])
def test_sample_settings_are_checked_before_loading(sample_main, files, tmp_path, capsys, extra, expected):
    argv = ["--checkpoint", str(files["dit_ckpt"]), "--prompt", "a red circle", "--out", str(tmp_path / "out"), *extra]
    assert sample_main(argv) == 2
    assert f"cogvx-sample: error: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [
    ("not_a_ckpt", "cannot be read as a checkpoint: it is not a PyTorch checkpoint"),
    ("vae_ckpt", "is a vae-stage checkpoint (VAE weights), not a dit-stage one; give a dit run directory or one of "
                 "its checkpoints/*.ckpt."),
    ("missing", "does not exist; give a dit run directory"),
])
def test_sample_checkpoint_of_the_wrong_kind(sample_main, files, tmp_path, capsys, given, expected):
    path = files.get(given, tmp_path / "missing")
    assert sample_main(["--checkpoint", str(path), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    assert f"cogvx-sample: error: --checkpoint {path} {expected}" in capsys.readouterr().err


def test_sample_out_that_is_a_file(sample_main, files, capsys):
    """Found before minutes of sampling, not when the first mp4 is written."""
    argv = ["--checkpoint", str(files["dit_ckpt"]), "--prompt", "x", "--out", str(files["not_a_ckpt"])]
    assert sample_main(argv) == 2
    assert "is a file; give a folder for the mp4s" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_sample_cuda_without_cuda(sample_main, files, tmp_path, capsys):
    argv = ["--checkpoint", str(files["dit_ckpt"]), "--prompt", "x", "--out", str(tmp_path), "--device", "cuda"]
    assert sample_main(argv) == 2
    assert "asks for CUDA, which this machine does not have; use --device cpu." in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ cogvx-data


def test_precompute_negative_workers(tmp_path, capsys):
    from cogvx_train.cli.data import main

    argv = ["precompute", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--vae-size", "tiny",
            "--text-encoder", "tiny", "--workers", "-1"]
    assert main(argv) == 2
    assert "num_workers (-1) must be >= 0 decoding processes" in capsys.readouterr().err


def test_precompute_vae_weights_that_are_no_checkpoint(files, tmp_path, capsys):
    from cogvx_train.cli.data import main

    argv = ["precompute", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "cache"), "--vae-size", "tiny",
            "--text-encoder", "tiny", "--vae-weights", str(files["not_a_ckpt"])]
    assert main(argv) == 2
    assert f"--vae-weights {files['not_a_ckpt']} cannot be read as a checkpoint" in capsys.readouterr().err

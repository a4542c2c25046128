"""Own your checkpoints: a DeepSpeed ZeRO-2 checkpoint written by 2 ranks merges, without DeepSpeed, into exactly
the full state the engine itself reports (fp32 weights, Adam moments, step), turns into a single-file training
checkpoint that torch's AdamW loads, and scatters back into an engine of 3 ranks unchanged. `cogvx-convert`
writes one safetensors file (weights + EMA) from any checkpoint, with one clear sentence on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from scale_helpers import HERE, PYTHON, TORCHRUN, consolidate_without_deepspeed, env_for, free_port, launch

from cogvx_train.train.consolidate import load_pickle, read_deepspeed_checkpoint, read_lightning_checkpoint


def zero_worker(nproc: int, mode: str, folder) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), str(HERE / "scale_helpers.py"), "zero-worker", mode, str(folder)]


def assert_same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero2_shards_merge_to_the_engines_full_state_and_scatter_to_three_ranks(tmp_path, cache_dir):
    env = env_for(cache_dir, tmp_path / "outputs")
    launch([zero_worker(2, "train", tmp_path)], env, tmp_path)
    engine_view = torch.load(tmp_path / "engine_view.pt")  # gathered by the engine itself at the end of training

    # merged in a process where `import deepspeed` fails, written as a single-file training checkpoint
    summary = consolidate_without_deepspeed(tmp_path / "ckpt", tmp_path / "full.ckpt")
    assert "with optimizer moments" in summary and "(2 ZeRO shards)" in summary
    single = read_lightning_checkpoint(tmp_path / "full.ckpt")
    merged = read_deepspeed_checkpoint(tmp_path / "ckpt")
    for full in (merged, single):
        assert full.step == engine_view["step"] == 3
        assert_same(full.weights, engine_view["weights"], "weights")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same(full.moments[key], engine_view[key], key)
        assert [g["lr"] for g in full.param_groups] == engine_view["lr"]
        assert [g["weight_decay"] for g in full.param_groups] == [0.1, 0.0]
    # the shards are padded (81 and 31 values over 2 ranks): the merge must cut the padding off the last piece
    shard = load_pickle(tmp_path / "ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert shard["optimizer_state_dict"]["group_paddings"] != [0, 0]

    # the single file is a valid torch AdamW state for the same parameters in the same groups
    sys.path.insert(0, str(HERE))
    from scale_helpers import _tiny_model

    model = _tiny_model()
    named = dict(model.named_parameters())
    ckpt = torch.load(tmp_path / "full.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in g["param_names"]]} for g in groups])
    optimizer.load_state_dict(ckpt["optimizer_states"][0])
    for group in optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            assert torch.equal(optimizer.state[p]["exp_avg"], engine_view["exp_avg"][name])

    # scattered into 3 ranks (a world size DeepSpeed cannot load these shards at): the same full state
    launch([zero_worker(3, "load", tmp_path)], env, tmp_path)
    loaded = torch.load(tmp_path / "loaded_view_3.pt")
    assert loaded["step"] == 3 and loaded["lr"] == engine_view["lr"]
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert_same(loaded[key], engine_view[key], f"after scatter: {key}")


def fake_dit_checkpoint(path):
    torch.manual_seed(0)
    live = {"proj.weight": torch.randn(4, 3), "proj.bias": torch.randn(4)}
    ema = {k: v + 1.0 for k, v in live.items()}
    ckpt = {"state_dict": {f"dit.{k}": v for k, v in live.items()}, "global_step": 7, "epoch": 0,
            "hyper_parameters": {"dit_size": "tiny"}, "cogvx_dit": {"format": 1},
            "dit_ema": {"decay": 0.99, "start_step": 0, "num_updates": 7, "shadow": ema}}
    torch.save(ckpt, path)
    return live, ema


def convert(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cogvx_train.cli.convert", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_converts_a_lightning_checkpoint_to_one_safetensors_file(tmp_path):
    live, ema = fake_dit_checkpoint(tmp_path / "step.ckpt")
    consolidate_without_deepspeed(tmp_path / "step.ckpt", tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == {"dit.proj.weight", "dit.proj.bias", "ema.dit.proj.weight", "ema.dit.proj.bias"}
    for k in live:
        assert torch.equal(tensors[f"dit.{k}"], live[k]) and torch.equal(tensors[f"ema.dit.{k}"], ema[k])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["global_step"] == 7 and meta["weights"] == "live+ema" and meta["hyper_parameters"]["dit_size"] == "tiny"

    done = convert([tmp_path / "step.ckpt", "--out", tmp_path / "ema.safetensors", "--ema"])
    assert done.returncode == 0, done.stderr
    tensors = load_file(tmp_path / "ema.safetensors")
    assert set(tensors) == {"dit.proj.weight", "dit.proj.bias"}
    assert all(torch.equal(tensors[f"dit.{k}"], ema[k]) for k in ema)


@pytest.mark.parametrize("make, args, expected", [
    (False, ["{tmp}/missing.ckpt", "--out", "{tmp}/m.safetensors"], "does not exist"),
    (True, ["{tmp}/step.ckpt", "--out", "{tmp}/m.bin"], "must end in .safetensors"),
    (True, ["{tmp}", "--out", "{tmp}/m.safetensors"], "is neither a DeepSpeed checkpoint directory nor a run"),
])
def test_cli_bad_input_gets_one_sentence(tmp_path, make, args, expected):
    if make:
        fake_dit_checkpoint(tmp_path / "step.ckpt")
    done = convert([a.format(tmp=tmp_path) for a in args])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("cogvx-convert: error:") and expected in done.stderr, done.stderr


@pytest.mark.parametrize("damage, expected", [
    ("foreign", "is not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)"),
    ("truncated", "the checkpoint is incomplete (cut short while saving, or damaged) — use an earlier step-*.ckpt"),
])
def test_cli_tells_a_foreign_file_from_a_checkpoint_cut_short(tmp_path, damage, expected):
    """A file that never was a checkpoint is not called an incomplete one (and the reverse)."""
    path = tmp_path / "step.ckpt"
    if damage == "foreign":
        path.write_text("epoch,step,loss\n0,1,0.5\n")
    else:
        fake_dit_checkpoint(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    done = convert([path, "--out", tmp_path / "m.safetensors"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"cogvx-convert: error: {path} ") and expected in done.stderr, done.stderr
    other = [e for d, e in [("foreign", "is not a PyTorch checkpoint"), ("truncated", "incomplete")] if d != damage]
    assert other[0] not in done.stderr

"""DeepSpeed for real on the CPU: `trainer=deepspeed_zero2` with two torchrun ranks (gloo, DeepSpeed's CPU
accelerator, fp32) trains the tiny DiT through the `cogvx-train` CLI. Both ranks keep bit-identical weights, the
engine clips at optim.grad_clip, and the checkpoint is DeepSpeed's sharded directory, written atomically and
readable without DeepSpeed. ZeRO-3 is exercised for construction and two steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scale_helpers import (TINY_DIT, consolidate_without_deepspeed, env_for, free_port, launch, run_dir, sync_digests,
                           torchrun)

from cogvx_train.train.consolidate import load_pickle, read_deepspeed_checkpoint


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero2_two_ranks_train_in_sync_and_write_a_sharded_checkpoint(tmp_path, cache_dir, tiny_vae_dir):
    out = tmp_path / "outputs"
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=deepspeed_zero2", "trainer.devices=2",
            "trainer.max_steps=4"]
    outputs = launch([torchrun(2, free_port(), args)], env_for(cache_dir, out), tmp_path)
    digests = sync_digests(outputs[0])
    assert sorted(digests) == [2, 4], outputs[0][-3000:]
    assert all(d[0] == d[1] for d in digests.values()) and digests[2][0] != digests[4][0]

    run = run_dir(out)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 4
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "latest").read_text().strip() == "checkpoint"
    shards = sorted(p.name for p in (last / "checkpoint").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]  # atomic swaps
    assert (run / "checkpoints" / "step-00000002.ckpt" / "latest").is_file()

    # the engine clipped at optim.grad_clip=0.5 (its config and its optimizer wrapper say so)
    model_states = load_pickle(last / "checkpoint" / "mp_rank_00_model_states.pt")
    assert model_states["ds_config"]["gradient_clipping"] == 0.5
    assert load_pickle(last / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")[
        "optimizer_state_dict"]["clip_grad"] == 0.5

    # the shards merge into the weights the module held (fp32 run: the module copy equals the fp32 master)
    full = read_deepspeed_checkpoint(last)
    assert full.world_size == 2 and full.zero_stage == 2 and full.step == 4
    module = model_states["module"]
    assert set(module) == set(full.weights)
    assert all(torch.equal(module[k].float(), full.weights[k]) for k in module)
    assert full.client_state["global_step"] == 4 and full.client_state["dit_ema"]["num_updates"] == 4

    # one safetensors file, converted where `import deepspeed` fails: fp32 weights plus the EMA
    consolidate_without_deepspeed(last, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    shadow = full.client_state["dit_ema"]["shadow"]
    assert set(tensors) == set(module) | {f"ema.dit.{k}" for k in shadow}
    assert all(torch.equal(tensors[k], full.weights[k]) for k in module)
    assert all(torch.equal(tensors[f"ema.dit.{k}"], v.float()) for k, v in shadow.items())


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero3_two_ranks_construct_and_step(tmp_path, cache_dir, tiny_vae_dir):
    """ZeRO-3 partitions the parameters themselves. The module's EMA reads whole parameters, which ZeRO-3 does not
    hold, so it is off here (see the report: the EMA needs GatheredParameters under ZeRO-3)."""
    out = tmp_path / "outputs"
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=deepspeed_zero3", "trainer.devices=2",
            "trainer.max_steps=2", "ema.enabled=false"]
    outputs = launch([torchrun(2, free_port(), args)], env_for(cache_dir, out), tmp_path)
    assert "weight sync check skipped" in outputs[0]  # parameters are sharded by design under ZeRO-3
    run = run_dir(out)
    full = read_deepspeed_checkpoint(run / "checkpoints" / "last.ckpt")
    assert full.zero_stage == 3 and full.world_size == 2 and full.step == 2
    assert full.weights["dit.proj_out.weight"].shape[0] > 0 and set(full.moments) == {"exp_avg", "exp_avg_sq"}
    from cogvx_train.dit import load_diffusers_transformer

    exported = load_diffusers_transformer(run / "export" / "transformer", dtype=torch.float32).state_dict()
    assert all(torch.equal(exported[k], full.weights[f"dit.{k}"]) for k in exported)


def test_sharded_save_swaps_directories_and_recovers_an_interrupted_swap(tmp_path):
    from cogvx_train.train.strategies import recover_checkpoint_dir, swap_in_directory

    target, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    target.mkdir()
    (target / "latest").write_text("old")
    tmp.mkdir()
    (tmp / "latest").write_text("new")
    swap_in_directory(tmp, target)
    assert (target / "latest").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # a kill between the two renames leaves only <target>.old, a complete checkpoint: it is put back
    target.rename(tmp_path / "last.ckpt.old")
    assert recover_checkpoint_dir(target) == target and (target / "latest").read_text() == "new"
    assert recover_checkpoint_dir(target) == target  # nothing to do the second time

"""DeepSpeed for real on the CPU: `trainer=deepspeed_zero2` with two torchrun ranks (gloo, DeepSpeed's CPU
accelerator, fp32) trains the tiny DiT through the `cogvx-train` CLI. Both ranks keep bit-identical weights, the
engine clips at optim.grad_clip, and the checkpoint is DeepSpeed's sharded directory, written atomically and
readable without DeepSpeed. ZeRO-3 trains, validates and resumes with its EMA sharded like the weights."""

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
def test_zero3_two_ranks_keep_a_sharded_ema_that_resumes_converts_and_exports_whole(tmp_path, cache_dir,
                                                                                    tiny_vae_dir):
    """ZeRO-3 partitions the parameters themselves, and the EMA with them (each rank averages and saves its own
    slices). The validations at steps 0 and 2 sample with the EMA swapped into the partitioned model. A resumed run
    restores each rank's slices: merged, the EMA of every step is exactly one EMA update of the previous step's
    towards that step's weights, before and after the resume. `cogvx-convert` writes it whole, and the run exports
    it."""
    out = tmp_path / "outputs"
    env = env_for(cache_dir, out)
    validate = ["data.num_val_clips=2", "trainer.val_check_interval=2", "sampling.num_steps=2",
                "sampling.prompts=[a red circle moves from left to right]"]
    args = [*(a for a in TINY_DIT if not a.startswith(("data.num_val_clips=", "trainer.val_check_interval="))),
            *validate, f"model.vae.weights={tiny_vae_dir}", "trainer=deepspeed_zero3", "trainer.devices=2",
            "checkpoint.every_n_steps=1"]
    outputs = launch([torchrun(2, free_port(), [*args, "trainer.max_steps=2"])], env, tmp_path)
    assert "weight sync check skipped" in outputs[0]  # parameters are sharded by design under ZeRO-3
    run = run_dir(out)
    samples = sorted(p.name for p in run.rglob("step*_0.mp4"))
    assert samples == ["step0000000_0.mp4", "step0000002_0.mp4"], (samples, outputs[0][-3000:])
    launch([torchrun(2, free_port(), [*args, "trainer.max_steps=3", f"resume={run}"])], env, tmp_path)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 3

    last = run / "checkpoints" / "last.ckpt"
    full = read_deepspeed_checkpoint(last)
    assert full.zero_stage == 3 and full.world_size == 2 and full.step == 3
    assert full.weights["dit.proj_out.weight"].shape[0] > 0 and set(full.moments) == {"exp_avg", "exp_avg_sq"}
    for rank in (0, 1):  # each rank's model-states file holds its own EMA slices
        own = load_pickle(last / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")["dit_ema"]
        assert (own["partition"]["rank"], own["partition"]["world_size"]) == (rank, 2)
        assert own["shadow"]["proj_out.weight"].dim() == 1  # a flat slice, not the whole matrix

    # merged: whole, finite, and EMA_n = lerp(EMA_{n-1}, W_n, 1 - d_n) with the warm-up d_n = min(decay, n / (9 + n))
    states = [read_deepspeed_checkpoint(run / "checkpoints" / f"step-0000000{n}.ckpt") for n in (1, 2, 3)]
    emas = [state.client_state["dit_ema"] for state in states]
    assert [ema["num_updates"] for ema in emas] == [1, 2, 3] and all("partition" not in ema for ema in emas)
    shadow = emas[2]["shadow"]
    assert {f"dit.{k}" for k in shadow} == {k for k in full.weights if k.startswith("dit.")}
    for n in (2, 3):  # step 3 ran after the resume
        d = min(emas[n - 1]["decay"], n / (9 + n))
        for k, v in emas[n - 1]["shadow"].items():
            live = states[n - 1].weights[f"dit.{k}"]
            assert v.shape == live.shape and torch.isfinite(v).all(), k
            assert torch.equal(v, emas[n - 2]["shadow"][k].lerp(live, 1.0 - d)), (n, k)
    moved = [k for k, v in shadow.items() if not torch.equal(v, full.weights[f"dit.{k}"])]
    assert len(moved) >= 10, moved  # (zero-initialised gates keep some weights at 0 for the first steps)

    # cogvx-convert (no DeepSpeed) writes the whole EMA next to the weights; the run exported the EMA
    consolidate_without_deepspeed(last, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(tensors[f"ema.dit.{k}"], v) for k, v in shadow.items())
    from cogvx_train.dit import load_diffusers_transformer

    exported = load_diffusers_transformer(run / "export" / "transformer", dtype=torch.float32).state_dict()
    assert set(exported) == set(shadow) and all(torch.equal(exported[k], shadow[k]) for k in exported)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, offload", [(2, ["trainer.offload_optimizer=true"]),
                                            (3, ["trainer.offload_optimizer=true", "trainer.offload_parameters=true"])])
def test_zero_offload_trains_in_sync_and_records_it_in_the_checkpoint(stage, offload, tmp_path, cache_dir,
                                                                      tiny_vae_dir):
    """`trainer.offload_optimizer` (ZeRO-2/3) and `trainer.offload_parameters` (ZeRO-3) reach the engine: the
    optimizer states (and ZeRO-3's parameters) live on the host, the module's torch AdamW steps them there, and two
    ranks train in step. On a CPU the host is the device, so this checks the plumbing, not a memory saving."""
    out = tmp_path / "outputs"
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", f"trainer=deepspeed_zero{stage}", *offload,
            "trainer.devices=2", "trainer.max_steps=4"]
    outputs = launch([torchrun(2, free_port(), args)], env_for(cache_dir, out), tmp_path)
    run = run_dir(out)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 4
    if stage == 2:  # ZeRO-3 shards the parameters by design: its weight sync check is skipped
        digests = sync_digests(outputs[0])
        assert sorted(digests) == [2, 4] and all(d[0] == d[1] for d in digests.values()), outputs[0][-3000:]
    last = run / "checkpoints" / "last.ckpt"
    states = "mp_rank_00_model_states.pt" if stage == 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    zero = load_pickle(last / "checkpoint" / states)["ds_config"]["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == "cpu"
    assert stage == 2 or zero["offload_param"]["device"] == "cpu"
    full = read_deepspeed_checkpoint(last)
    assert full.step == 4 and set(full.moments) == {"exp_avg", "exp_avg_sq"}
    assert all(torch.isfinite(w).all() for w in full.weights.values())


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

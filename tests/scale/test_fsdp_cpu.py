"""FSDP for real on the CPU: `trainer=fsdp` with two torchrun ranks (gloo, torch's FullyShardedDataParallel with
FULL_SHARD, fp32) trains the tiny DiT through the `cogvx-train` CLI. Sharding must not change the training: after
the same steps the weights and the EMA equal those of a DDP run of the same seed (norm clipping active, so a
per-shard clip would show), the weight-decay groups are the DDP ones, the checkpoint is torch's sharded
distributed checkpoint, the EMA keeps its exact recurrence across a resume, and `cogvx-convert` (no DeepSpeed)
and the run's export both give whole tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scale_helpers import (TINY_DIT, consolidate_without_deepspeed, env_for, free_port, launch, run_dir, sync_digests,
                           torchrun)

from cogvx_train.train.consolidate import read_fsdp_checkpoint, read_lightning_checkpoint

# the gradients of the tiny DiT have norms around 1e-3: this clip scales every step (and by a different factor
# per rank's shard if the norm were taken per shard, which moves the weights by ~1e-4 after two Adam steps)
CLIP = "optim.grad_clip=0.0001"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_two_ranks_train_like_ddp_resume_and_convert(tmp_path, cache_dir, tiny_vae_dir):
    replaced = ("optim.grad_clip=", "checkpoint.every_n_steps=", "data.num_val_clips=", "trainer.val_check_interval=")
    validate = ["data.num_val_clips=2", "trainer.val_check_interval=2", "sampling.num_steps=2",
                "sampling.prompts=[a red circle moves from left to right]"]
    args = [*(a for a in TINY_DIT if not a.startswith(replaced)), CLIP, *validate, f"model.vae.weights={tiny_vae_dir}",
            "trainer.devices=2", "checkpoint.every_n_steps=1"]
    fsdp_out, ddp_out = tmp_path / "fsdp", tmp_path / "ddp"
    fsdp_log = launch([torchrun(2, free_port(), [*args, "trainer=fsdp", "trainer.max_steps=2"])],
                      env_for(cache_dir, fsdp_out), tmp_path)[0]
    assert "weight sync check skipped: FSDPWithCPUStrategy shards parameters" in fsdp_log, fsdp_log[-3000:]
    ddp_log = launch([torchrun(2, free_port(), [*args, "trainer=ddp", "trainer.max_steps=2"])],
                     env_for(cache_dir, ddp_out), tmp_path)[0]
    assert all(d[0] == d[1] for d in sync_digests(ddp_log).values())

    # torch's sharded checkpoint: each rank wrote its half of every matrix (dim 0 split in two chunks)
    run = run_dir(fsdp_out)
    step2 = run / "checkpoints" / "step-00000002.ckpt"
    assert sorted(p.name for p in step2.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(step2).read_metadata().state_dict_metadata["model.dit.proj_out.weight"]
    assert sorted(tuple(c.offsets) for c in saved.chunks) == [(0, 0), (saved.size[0] // 2, 0)]

    # the same training as DDP: weights, EMA, Adam step and the weight-decay groups (matrices decay, vectors not)
    fsdp = read_fsdp_checkpoint(step2)
    ddp = read_lightning_checkpoint(run_dir(ddp_out) / "checkpoints" / "step-00000002.ckpt")
    assert fsdp.world_size == 2 and fsdp.step == 2 and fsdp.client_state["global_step"] == 2
    assert fsdp.weights.keys() == ddp.weights.keys()
    for name, value in ddp.weights.items():
        assert value.shape == fsdp.weights[name].shape
        torch.testing.assert_close(fsdp.weights[name], value, rtol=0, atol=1e-6, msg=name)
    ddp_ema, fsdp_ema = ddp.ema_weights(), fsdp.ema_weights()
    assert fsdp_ema.keys() == ddp_ema.keys() and len(fsdp_ema) == len(ddp.weights)
    for name, value in ddp_ema.items():
        torch.testing.assert_close(fsdp_ema[name], value, rtol=0, atol=1e-6, msg=name)
    decay, no_decay = fsdp.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert set(decay["params"]) == {n for n, v in ddp.weights.items() if v.ndim >= 2}
    assert set(no_decay["params"]) == {n for n, v in ddp.weights.items() if v.ndim < 2}
    assert set(fsdp.moments) == {"exp_avg", "exp_avg_sq"} and fsdp.moments["exp_avg"].keys() == ddp.weights.keys()

    # validation at steps 0 and 2: the same losses, and the same samples drawn with the EMA swapped in
    for step in (0, 2):
        fsdp_video = _frames(run / "samples" / f"step{step:07d}_0.mp4")
        ddp_video = _frames(run_dir(ddp_out) / "samples" / f"step{step:07d}_0.mp4")
        assert fsdp_video.shape == ddp_video.shape and (fsdp_video - ddp_video).abs().max() <= 1, step
    assert _val_losses(run) == pytest.approx(_val_losses(run_dir(ddp_out)), rel=1e-5) and len(_val_losses(run)) == 2

    # the export after fit holds the whole EMA transformer (every rank's pieces gathered)
    from cogvx_train.dit import load_diffusers_transformer

    exported = load_diffusers_transformer(run / "export" / "transformer", dtype=torch.float32).state_dict()
    assert set(exported) == {n.removeprefix("dit.") for n in fsdp_ema}
    assert all(torch.equal(exported[n.removeprefix("dit.")], t) for n, t in fsdp_ema.items())

    # resume at the same world size: one more step, EMA_3 = lerp(EMA_2, W_3, 1 - d_3) with d_3 = min(decay, 3 / 12)
    launch([torchrun(2, free_port(), [*args, "trainer=fsdp", "trainer.max_steps=3", f"resume={run}"])],
           env_for(cache_dir, fsdp_out), tmp_path)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 3
    step3 = read_fsdp_checkpoint(run / "checkpoints" / "last.ckpt")
    assert step3.step == 3 and step3.client_state["dit_ema"]["num_updates"] == 3
    d = min(step3.client_state["dit_ema"]["decay"], 3 / 12)
    ema3 = step3.ema_weights()
    for name, before in fsdp_ema.items():
        assert torch.equal(ema3[name], before.lerp(step3.weights[name], 1.0 - d)), name
    assert sum(not torch.equal(fsdp.weights[n], step3.weights[n]) for n in fsdp.weights) >= 10

    # one safetensors file from the sharded checkpoint, where `import deepspeed` fails: weights plus the EMA
    consolidate_without_deepspeed(run, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == set(step3.weights) | {f"ema.{n}" for n in ema3}
    assert all(torch.equal(tensors[n], t) for n, t in step3.weights.items())
    assert all(torch.equal(tensors[f"ema.{n}"], t) for n, t in ema3.items())


def _frames(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]).int()


def _val_losses(run) -> list[float]:
    import csv

    with open(run / "metrics.csv") as f:
        return [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]

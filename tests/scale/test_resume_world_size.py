"""Resume at another world size. A run trained by 2 ranks continues on 1 (`resume=<run dir>` with
trainer.devices=1): the step counter, the optimizer (Adam's step), the LR schedule and the data position carry on.
DDP checkpoints are whole, so Lightning reloads them at any world size; a DeepSpeed ZeRO-2 checkpoint is sharded
per rank, and the engine refuses other world sizes, so CogvxDeepSpeedStrategy merges the shards (consolidate.py)
and scatters weights, moments and step into the new partitions. An FSDP checkpoint is torch's distributed
checkpoint, which reads any world size's shards into the new ones (on one rank torch's FSDP holds whole tensors);
the EMA is saved whole. The FSDP run continues exactly as the DDP run does, also when it switches
`trainer.wrap_blocks` on resume (the checkpoint holds the model's own names whatever the FSDP units)."""

from __future__ import annotations

import json

import pytest
import torch
from scale_helpers import TINY_DIT, env_for, free_port, launch, run_dir, single, torchrun

from cogvx_train.train.consolidate import read_deepspeed_checkpoint, read_fsdp_checkpoint, read_lightning_checkpoint


def train_two_then_one(tmp_path, cache_dir, vae, strategy: list[str], resumed: list[str] = ()):
    """4 steps on 2 ranks, then `resume=` on 1 rank to step 6 (`resumed`: more overrides for the second launch)."""
    out = tmp_path / "outputs"
    env = env_for(cache_dir, out)
    base = [*TINY_DIT, f"model.vae.weights={vae}", *strategy]
    launch([torchrun(2, free_port(), [*base, "trainer.devices=2", "trainer.max_steps=4"])], env, tmp_path)
    run = run_dir(out)
    outputs = launch([single([*base, "trainer.devices=1", "trainer.max_steps=6", *resumed, f"resume={run}"])], env,
                     tmp_path)
    assert run_dir(out) == run  # the same run directory continues
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 6
    assert (run / "command.txt").read_text().count("resume=") == 1
    return run, outputs[0]


def check_continued(state: dict) -> None:
    assert state["global_step"] == 6
    assert state["lr_schedulers"][0]["last_epoch"] == 6  # the LR schedule continued rather than restarting
    position = state["FramePackDataModule"]
    # global batches: 2 ranks x 4 steps, then 1 rank x 2 steps -> the 10 first batches of the epoch, each once
    assert (position["epoch"], position["consumed"]) == (0, 10)


@pytest.fixture(scope="module")
def ddp_two_then_one(tmp_path_factory, cache_dir, tiny_vae_dir):
    """(run directory, output of the 1-rank launch) of the DDP run: the reference the FSDP run must match."""
    return train_two_then_one(tmp_path_factory.mktemp("ddp"), cache_dir, tiny_vae_dir, ["trainer=ddp"])


def metric(run, key: str) -> dict[int, float]:
    """{step: value} of one metric in the run's metrics.csv."""
    import csv

    with open(run / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_run_of_two_ranks_continues_on_one(ddp_two_then_one):
    run, output = ddp_two_then_one
    assert "allowed change trainer.devices: 2 -> 1" in output
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    check_continued(ckpt)
    adam = ckpt["optimizer_states"][0]["state"]
    assert {int(s["step"]) for s in adam.values()} == {6}  # Adam's moments were restored, not restarted
    assert ckpt["dit_ema"]["num_updates"] == 6


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_deepspeed_zero2_run_of_two_ranks_continues_on_one(tmp_path, cache_dir, tiny_vae_dir):
    run, output = train_two_then_one(tmp_path, cache_dir, tiny_vae_dir, ["trainer=deepspeed_zero2"])
    assert "was written by 2 ranks and this run has 1" in output
    full = read_deepspeed_checkpoint(run / "checkpoints" / "last.ckpt")
    assert full.world_size == 1
    check_continued(full.client_state)
    assert full.step == 6 and full.client_state["dit_ema"]["num_updates"] == 6
    step4 = read_deepspeed_checkpoint(run / "checkpoints" / "step-00000004.ckpt")
    assert step4.world_size == 2 and step4.step == 4
    changed = [k for k in step4.weights if not torch.equal(step4.weights[k], full.weights[k])]
    assert len(changed) > len(full.weights) // 2  # and it trained on from there


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_run_of_two_ranks_continues_on_one_like_ddp(tmp_path, cache_dir, tiny_vae_dir, ddp_two_then_one):
    run, output = train_two_then_one(tmp_path, cache_dir, tiny_vae_dir, ["trainer=fsdp"])
    assert "allowed change trainer.devices: 2 -> 1" in output
    step4 = read_fsdp_checkpoint(run / "checkpoints" / "step-00000004.ckpt")
    assert step4.world_size == 2 and step4.step == 4
    full = read_fsdp_checkpoint(run / "checkpoints" / "last.ckpt")
    assert full.world_size == 1  # the directory was replaced whole: no shard of the 2-rank save is left in it
    check_like_ddp(run, ddp_two_then_one[0])


def check_like_ddp(run, ddp_run) -> None:
    """The FSDP run `run` (2 ranks, then 1) ended where the DDP run `ddp_run` did: resharded, not restarted."""
    step4 = read_fsdp_checkpoint(run / "checkpoints" / "step-00000004.ckpt")
    full = read_fsdp_checkpoint(run / "checkpoints" / "last.ckpt")
    check_continued(full.client_state)
    assert full.step == 6 and full.client_state["dit_ema"]["num_updates"] == 6
    # the weights and the EMA after 2 + 1 ranks are the DDP run's (Adam restarted at step 4 would move the weights
    # differently), and so is the gradient norm logged at every step (over both ranks' shards, then the one
    # rank's whole gradients)
    ddp = read_lightning_checkpoint(ddp_run / "checkpoints" / "last.ckpt")
    assert ddp.client_state["global_step"] == 6
    assert full.weights.keys() == ddp.weights.keys()
    for name, value in ddp.weights.items():
        torch.testing.assert_close(full.weights[name], value, rtol=0, atol=1e-6, msg=name)
    fsdp_ema, ddp_ema = full.ema_weights(), ddp.ema_weights()
    assert fsdp_ema.keys() == ddp_ema.keys()
    for name, value in ddp_ema.items():
        torch.testing.assert_close(fsdp_ema[name], value, rtol=0, atol=1e-6, msg=name)
    changed = [k for k in step4.weights if not torch.equal(step4.weights[k], full.weights[k])]
    assert len(changed) > len(full.weights) // 2  # it trained on from step 4
    assert metric(run, "train/grad_norm") == pytest.approx(metric(ddp_run, "train/grad_norm"), rel=1e-5)
    assert sorted(metric(run, "train/grad_norm")) == list(range(6))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_run_resumes_with_the_other_wrapping_like_ddp(tmp_path, cache_dir, tiny_vae_dir, ddp_two_then_one):
    """`trainer.wrap_blocks` may change on resume: 2 ranks with one FSDP unit per transformer block, then 1 rank
    with the whole DiT as one unit, continue as the DDP run does (weights, EMA, Adam's step, grad norms)."""
    run, output = train_two_then_one(tmp_path, cache_dir, tiny_vae_dir, ["trainer=fsdp"],
                                     resumed=["trainer.wrap_blocks=false"])
    assert "allowed change trainer.wrap_blocks: True -> False" in output
    assert "FSDP units: the root and 0 inner (the whole model is one unit)" in output
    assert read_fsdp_checkpoint(run / "checkpoints" / "step-00000004.ckpt").world_size == 2
    check_like_ddp(run, ddp_two_then_one[0])

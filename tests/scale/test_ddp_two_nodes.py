"""`trainer=ddp` for real: two torchrun "nodes" on localhost (one CPU rank each, gloo) train the tiny DiT through
the `cogvx-train` CLI, and the weight sync check proves after every other step that both ranks hold bit-identical
weights. The check itself is shown to catch a rank whose weights drifted, and to name it."""

from __future__ import annotations

import json

import pytest
import torch
from scale_helpers import TINY_DIT, assert_trained_in_sync, env_for, free_port, launch, run_dir, torchrun

from cogvx_train.train.sync_check import describe_divergence, parameter_checksums


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_nodes_train_with_identical_weights(tmp_path, cache_dir, tiny_vae_dir):
    out = tmp_path / "outputs"
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=ddp", "trainer.devices=1",
            "trainer.num_nodes=2", "trainer.max_steps=4"]
    port = free_port()
    outputs = launch([torchrun(1, port, args, nnodes=2, node_rank=r) for r in (0, 1)], env_for(cache_dir, out),
                     tmp_path)
    assert_trained_in_sync(outputs[0])
    run = run_dir(out)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 4
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    # 2 ranks x 4 steps: 8 global batches consumed, each rank drew 4
    position = ckpt["FramePackDataModule"]
    assert (position["consumed"], position["steps_in_epoch"]) == (8, 4)


def test_weight_checksum_sees_a_single_ulp():
    torch.manual_seed(0)
    w = torch.randn(4, 5)
    nudged = w.clone()
    nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(float("inf")))
    same = parameter_checksums([("w", w.clone()), ("b", torch.zeros(3, dtype=torch.bfloat16))])
    assert torch.equal(parameter_checksums([("w", w), ("b", torch.zeros(3, dtype=torch.bfloat16))]), same)
    assert not torch.equal(parameter_checksums([("w", nudged), ("b", torch.zeros(3, dtype=torch.bfloat16))]), same)


def test_divergence_names_the_rank_and_the_first_parameter():
    rows = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 9, 4]])
    assert describe_divergence(rows[:2], ["a", "b", "c"], step=7) is None
    message = describe_divergence(rows, ["a", "b", "c"], step=7)
    assert "at step 7" in message and "rank 2 differs in 2 of 3 parameters (first: b)" in message
    assert "rank 1" not in message

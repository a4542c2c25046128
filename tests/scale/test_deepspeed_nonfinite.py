"""Non-finite steps under DeepSpeed ZeRO-2 and ZeRO-3, where the gradients live in the engine's per-rank partitions
(and under ZeRO-3 the weights and the EMA too): two CPU ranks train the tiny DiT and only rank 1 gets NaN batches.
Rank 0's own loss is finite, yet both ranks skip those steps together (weights and EMA unchanged, bit-identical
across ranks), count them, and two in a row roll both ranks back to the last (sharded) checkpoint. ZeRO-2 needs its
overflow check switched on at fp32; ZeRO-3 skips on its all-reduced non-finite gradient norm by itself."""

from __future__ import annotations

import pytest
import torch
from scale_helpers import HERE, NAN_STEPS, NONFINITE_STEPS, TORCHRUN, env_for, free_port, launch


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage, optimizer", [(2, "DeepSpeedZeroOptimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")])
def test_zero_skips_a_nan_on_one_rank_on_every_rank_and_rolls_back(tmp_path, cache_dir, tiny_vae_dir, stage,
                                                                   optimizer):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(HERE / "scale_helpers.py"), "nonfinite-worker", str(tmp_path), str(tiny_vae_dir), str(stage)]
    outputs = launch([cmd], env_for(cache_dir, tmp_path / "outputs"), tmp_path)
    assert NAN_STEPS == (1, 4, 5) and NONFINITE_STEPS == 7
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, rows in enumerate(ranks):
        assert len(rows) == 7 and {row["engine"] for row in rows} == {"DeepSpeedEngine"}, rank
        assert {row["optimizer"] for row in rows} == {optimizer}, rank
        # ZeRO-2 tests its partitions at fp32 too once switched on; ZeRO-3 has no switch (its norm check skips)
        assert all(row["overflow_check"] is (True if stage == 2 else None) for row in rows)
        w = [row["weights"] for row in rows]
        ema = [row["ema"] for row in rows]
        assert all(torch.isfinite(t).all() for t in w + ema), rank
        # NaN steps (rank 1's batch only) change nothing on either rank; normal steps change weights and EMA
        assert torch.equal(w[1], w[0]) and torch.equal(ema[1], ema[0]), f"rank {rank}: step 1 was applied"
        assert torch.equal(w[4], w[3]) and torch.equal(ema[4], ema[3]), f"rank {rank}: step 4 was applied"
        assert not torch.equal(w[2], w[1]) and not torch.equal(w[3], w[2]) and not torch.equal(ema[3], ema[2])
        # the second in a row rolls back to the step-3 checkpoint (weights and EMA after step 2); training goes on
        assert torch.equal(w[5], w[2]) and torch.equal(ema[5], ema[2]) and not torch.equal(w[5], w[3]), rank
        assert not torch.equal(w[6], w[5])
        assert [row["skipped"] for row in rows] == [0, 1, 1, 1, 2, 3, 3], rank
        assert [row["ema_updates"] for row in rows] == [1, 1, 2, 3, 3, 2, 3], rank
        assert rows[-1]["rollbacks"] == 1
    for a, b in zip(*ranks):  # every rank took every decision together
        assert torch.equal(a["weights"], b["weights"]) and torch.equal(a["ema"], b["ema"])
    assert "rolled model, EMA and optimizer back to" in outputs[0]

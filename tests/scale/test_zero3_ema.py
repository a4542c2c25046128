"""The EMA under DeepSpeed ZeRO-3, on a bare engine of 2 CPU ranks: each rank averages only its slice of every
parameter, and those slices together are exactly the whole EMA a plain model would keep of the same weights (a
NaN step on one rank, which the engine skips on both, included). Swapped in, the engine computes with the EMA and,
swapped out, with its live weights again, for gathered ("persistent") and sharded parameters alike. Each rank's
checkpoint file carries its own slices, which consolidation merges, and a slice loads only into its own rank."""

from __future__ import annotations

import pytest
import torch
from scale_helpers import EMA_NAN_STEP, HERE, TORCHRUN, env_for, free_port, launch


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero3_sharded_ema_equals_the_whole_one_swaps_in_and_merges(tmp_path, cache_dir):
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(HERE / "scale_helpers.py"), "ema-worker", str(tmp_path)]
    launch([cmd], env_for(cache_dir, tmp_path / "outputs"), tmp_path)
    seen = torch.load(tmp_path / "ema_view.pt", weights_only=False)

    # both kinds of parameter are exercised, and the slices are padded (45 and 9 values over 2 ranks)
    assert "0.bias" in seen["persistent"] and "0.weight" not in seen["persistent"]
    assert seen["slice_numel"]["0.weight"] == 23 and seen["slice_numel"]["3.weight"] == 18

    # the NaN step on rank 1 was skipped by the engine, left the weights alone and was not folded into the EMA
    steps = [seen[f"step{i}"] for i in range(3)]
    assert [s["skipped"] for s in steps] == [i == EMA_NAN_STEP for i in range(3)]
    assert [s["ema_updates"] for s in steps] == [1, 1, 2]
    assert [s["unchanged"] for s in steps] == [False, True, False]

    # the gathered slices are, bit for bit, the whole EMA of the gathered weights
    ema, reference = seen["ema"], seen["reference"]
    assert set(ema) == set(reference) == set(seen["slice_numel"])
    for name in reference:
        assert torch.equal(ema[name], reference[name]), name
        assert torch.isfinite(ema[name]).all()

    # swapped in: the engine's forward is the plain model's with the EMA; swapped out: with the live weights again
    assert not torch.equal(seen["out_plain_ema"], seen["out_plain_live"])
    assert torch.allclose(seen["out_swapped"], seen["out_plain_ema"], rtol=0, atol=1e-6)
    assert torch.equal(seen["out_after"], seen["out_live"])
    assert torch.allclose(seen["out_live"], seen["out_plain_live"], rtol=0, atol=1e-6)
    assert seen["slices_restored"] and seen["persistent_restored"]

    # checkpoint: merged from both ranks' files into whole tensors; a reload on the same rank is exact
    merged = seen["merged"]
    assert "partition" not in merged and merged["num_updates"] == 2
    for name in reference:
        assert torch.equal(merged["shadow"][name], reference[name]), name
        assert torch.equal(seen["reloaded"][name], reference[name]), name
    other_rank = seen["errors"]["other_rank"]
    assert "this is rank" in other_rank and "resumes at the world size that wrote it" in other_rank
    assert "merge the ranks' slices" in seen["errors"]["whole_model"]

"""Context parallelism over 2 real processes (gloo, CPU): forward and backward equal one process on the whole clip,
also with gradient checkpointing on the context-parallel side (its recomputation repeats the halo exchanges and
GroupNorm all-reduces in backward, in the same order on every rank)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from vae_model_helpers import randomize_

from cogvx_train.vae import (
    all_reduce_grads,
    build_vae,
    temporal_context_parallel,
    frame_split_sizes,
    gather_frames,
    split_frames_for_rank,
)

FRAMES, SIZE = 9, (16, 16)
MODES = {
    "whole_clip_groupnorm": dict(encoder_norm_window=None, decoder_norm_window=None),  # statistics all-reduced
    "windowed_groupnorm": dict(encoder_norm_window=4, decoder_norm_window=1),  # rank boundaries on windows
    "whole_clip_groupnorm+checkpointing": dict(encoder_norm_window=None, decoder_norm_window=None),
    "windowed_groupnorm+checkpointing": dict(encoder_norm_window=4, decoder_norm_window=1),
}


def _setup(mode: str, checkpointing: bool = False):
    torch.manual_seed(0)
    vae = randomize_(build_vae("tiny", **MODES[mode]), seed=0)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, FRAMES, *SIZE, generator=gen)
    weights = {  # fixed random loss weights, so every output element gets its own gradient
        "recon": torch.randn(1, 3, FRAMES, *SIZE, generator=gen),
        "mean": torch.randn(1, 16, 3, 2, 2, generator=gen),
        "logvar": torch.randn(1, 16, 3, 2, 2, generator=gen),
    }
    return vae, x, weights


def _loss(recon, posterior, weights) -> torch.Tensor:
    return (recon * weights["recon"]).sum() + (posterior.mean * weights["mean"]).sum() + (
        posterior.logvar * weights["logvar"]).sum()


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for mode in MODES:
        result = _run_mode(rank, world, mode)
        if rank == 0:
            out[mode] = result
    dist.destroy_process_group()


def _run_mode(rank: int, world: int, mode: str) -> dict:
    vae, x, weights = _setup(mode, checkpointing=mode.endswith("+checkpointing"))
    window = MODES[mode]["encoder_norm_window"]
    group = dist.group.WORLD
    local = {k: split_frames_for_rank(v, rank, world, 1 if k != "recon" else 4, None)
             for k, v in weights.items()}
    with temporal_context_parallel(vae, group):
        x_local = split_frames_for_rank(x, rank, world, window=window)
        recon, posterior = vae(x_local, sample_posterior=False)
        _loss(recon, posterior, local).backward()
    all_reduce_grads(vae, group)
    gathered = {name: gather_frames(t.detach(), group) for name, t in
                (("recon", recon), ("mean", posterior.mean), ("logvar", posterior.logvar))}
    gathered["grads"] = {n: p.grad.clone() for n, p in vae.named_parameters()}
    gathered["local_frames"] = x_local.shape[2]
    return gathered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results() -> dict:
    """Both modes, run once in one 2-process gloo group; rank 0's gathered outputs and all-reduced grads."""
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(MODES))
def test_two_rank_forward_and_backward_equal_one_process(two_rank_results, mode):
    out = two_rank_results[mode]

    vae, x, weights = _setup(mode)  # the reference: one process, no checkpointing
    recon, posterior = vae(x, sample_posterior=False)
    _loss(recon, posterior, weights).backward()

    assert out["local_frames"] == 5  # rank 0: frame 0 + 4, rank 1: 4
    torch.testing.assert_close(out["mean"], posterior.mean.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["logvar"], posterior.logvar.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["recon"], recon.detach(), atol=1e-4, rtol=1e-4)
    for name, param in vae.named_parameters():
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(out["grads"][name], param.grad, atol=1e-4 * max(scale, 1.0), rtol=1e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_frame_split_rule():
    assert frame_split_sizes(17, 2) == [9, 8]
    assert frame_split_sizes(49, 3) == [17, 16, 16]
    assert frame_split_sizes(161, 4, window=8) == [41, 40, 40, 40]
    assert frame_split_sizes(13, 2, window=8) == [9, 4]  # the partial window goes to the last rank
    assert frame_split_sizes(5, 2, time_compression=1) == [3, 2]  # latents: 1 + 2, 2
    x = torch.arange(17.0).view(1, 1, 17, 1, 1)
    assert split_frames_for_rank(x, 1, 2).flatten().tolist() == list(range(9, 17))
    with pytest.raises(ValueError, match="1 \\+ 4k frames, got 16"):
        frame_split_sizes(16, 2)
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        frame_split_sizes(9, 3, window=8)
    with pytest.raises(ValueError, match="ranks between the first and the last: 8"):
        frame_split_sizes(17, 3)  # [9, 4, 4]: the middle rank could not pass 2 deepest-layer frames on


def test_context_parallel_refuses_misaligned_slices(monkeypatch):
    vae = build_vae("tiny")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    vae.enable_context_parallel(object())
    with pytest.raises(ValueError, match="T = 4k, k >= 1"):
        vae.encode(torch.zeros(1, 3, 9, 16, 16))
    with pytest.raises(ValueError, match="do not combine"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16), chunk_frames=8)

"""Latent cache: the cached posterior and embeddings equal on-the-fly encoding, the batch order follows the frame-pack
rules (sharded, resumable), precompute restarts and refuses a mismatched cache, and a DiT trains from it without
loading VAE or T5."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from dit_helpers import loader, module_kwargs, trainer  # noqa: F401

from cogvx_train.data.frame_pack import DataPositionCallback, FramePackDataset, collate_frame_pack
from cogvx_train.data.latent_cache import (
    LatentCacheDataModule,
    LatentCacheDataset,
    add_precompute_args,
    collate_latent_cache,
    precompute,
    read_index,
    run_precompute,
)
from cogvx_train.data.manifest import read_manifest
from cogvx_train.dit.frozen_encoders import keyed_generator, load_frozen_text_encoder, load_frozen_vae
from cogvx_train.dit.module import DiTTrainingModule

FRAMES, RES, FPS = 5, [(16, 16), (16, 32)], 8.0
TEXT = {"kind": "tiny", "path": None, "max_length": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic set (6 clips, 2 stills, two aspect ratios), a saved tiny VAE and its cache."""
    from cogvx_train.data.synthetic import generate_synthetic_dataset
    from cogvx_train.vae import build_vae, export_diffusers_vae

    root = tmp_path_factory.mktemp("latent-cache")
    manifest = generate_synthetic_dataset(root / "set", num_videos=6, num_images=2, seed=1, frames=12, fps=8)
    torch.manual_seed(0)
    vae_dir = export_diffusers_vae(build_vae("tiny", scaling_factor=0.5), root / "vae")
    vae = {"size": "tiny", "weights": str(vae_dir), "scaling_factor": 0.5}
    precompute(manifest, root / "cache", vae=vae, text_encoder=TEXT, num_frames=FRAMES, fps=FPS, resolutions=RES,
               batch_size=2, shard_size=3, progress=False)
    return {"root": root, "manifest": manifest, "vae": vae, "cache": root / "cache"}


def test_cache_round_trip_equals_encoding_on_the_fly(data):
    cache = LatentCacheDataset(data["cache"])
    index = read_index(data["cache"])
    assert index["config"]["vae"]["weights_fingerprint"]["sha256"]
    assert index["config"]["scaling_factor"] == 0.5 and index["config"]["num_frames"] == FRAMES
    manifest = read_manifest(data["manifest"])
    rows = manifest.indices("ok", ("video", "image"))
    frames = FramePackDataset(manifest, rows, FRAMES, RES, target_fps=FPS, batch_size=2, start_mode="center")
    vae, text_encoder = load_frozen_vae(data["vae"]), load_frozen_text_encoder(TEXT)
    by_row = {s["row"]: i for i, s in enumerate(cache.samples)}
    assert sorted(by_row) == sorted(rows)  # every clip and still, once
    members = next(list(m[:2]) for b, m in zip(frames.buckets, frames.members) if not b.is_image and len(m) > 1)
    video_rows = [rows[m] for m in members]
    raw = collate_frame_pack([frames[(0, m)] for m in members])
    cached = collate_latent_cache([cache[(0, by_row[r])] for r in video_rows])
    with torch.no_grad():
        posterior = vae.encode(raw["video"])
        text = text_encoder(raw["caption"])
    assert torch.allclose(cached["latents_mean"], posterior.mean, atol=1e-6)
    assert torch.allclose(cached["latents_logvar"], posterior.logvar, atol=1e-6)
    assert torch.allclose(cached["text_embeds"], text, atol=1e-6)
    assert cached["latents_mean"].shape[:3] == (2, 16, 2) and cached["caption"] == raw["caption"]

    # the DiT sees the same clean latents and loss from either batch at the same step
    module = DiTTrainingModule(**module_kwargs(vae=data["vae"], text_encoder=TEXT))
    x_raw, text_raw = module.clean_latents_and_text(raw, keyed_generator(5, "posterior", 0, 0))
    x_cached, text_cached = module.clean_latents_and_text(cached, keyed_generator(5, "posterior", 0, 0))
    assert torch.allclose(x_raw, x_cached, atol=1e-5) and torch.allclose(text_raw, text_cached, atol=1e-6)
    assert module.training_step(raw, 0).item() == pytest.approx(module.training_step(cached, 0).item(), abs=1e-5)


def _order(dm: LatentCacheDataModule, count: int) -> list[list[int]]:
    out = []
    for batch in dm.train_dataloader():
        out.append(batch["index"].tolist())
        dm.on_train_batch_consumed(batch, world_size=dm._world_size)
        if len(out) == count:
            break
    return out


def test_batches_are_sharded_by_rank_and_resume_exactly(data):
    def dm(rank=None, world=None):
        return LatentCacheDataModule(data["cache"], batch_size=1, num_workers=0, seed=3, rank=rank, world_size=world)

    r0, r1 = _order(dm(0, 2), 3), _order(dm(1, 2), 3)
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}  # ranks never share a sample in an epoch
    straight = _order(dm(), 6)
    first = dm()
    assert _order(first, 2) == straight[:2]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint as plain values
    resumed = dm()
    resumed.load_state_dict(state)
    assert _order(resumed, 4) == straight[2:6]
    batch = next(iter(dm().train_dataloader()))
    assert set(batch) >= {"latents_mean", "latents_logvar", "text_embeds", "caption", "is_image", "index"}
    with pytest.raises(ValueError, match="not a cogvx-latent-cache-position"):
        dm().load_state_dict({"format": "cogvx-frame-pack-position"})


def test_precompute_restarts_from_its_shards_and_refuses_another_config(data, tmp_path):
    cache = data["cache"]
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert len(shards) >= 3  # 3 buckets (2 video aspect ratios + stills), 3 per shard
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    before = read_index(cache)
    (cache / "index.json").unlink()  # as if precompute died before writing the index
    precompute(data["manifest"], cache, vae=data["vae"], text_encoder=TEXT, num_frames=FRAMES, fps=FPS,
               resolutions=RES, batch_size=2, shard_size=3, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")} == stamps  # reused
    assert read_index(cache)["samples"] == before["samples"]
    with pytest.raises(ValueError, match="another config"):
        precompute(data["manifest"], cache, vae=data["vae"], text_encoder=TEXT, num_frames=9, fps=FPS,
                   resolutions=RES, progress=False)
    with pytest.raises(ValueError, match="not a finished latent cache"):
        LatentCacheDataModule(tmp_path, batch_size=1)

    parser = argparse.ArgumentParser()
    add_precompute_args(parser)
    args = parser.parse_args([str(data["manifest"]), "--out", str(tmp_path / "cli"), "--vae-size", "tiny",
                              "--vae-weights", data["vae"]["weights"], "--text-encoder", "tiny", "--max-length", "8",
                              "--num-frames", "5", "--resolution", "16x16", "--no-images", "--workers", "0",
                              "--device", "cpu", "--no-progress"])
    assert run_precompute(args) == 0
    index = read_index(tmp_path / "cli")
    assert index["num_samples"] == 6 and index["config"]["resolutions"] == [[16, 16]]


def test_a_dit_trains_from_the_cache_without_vae_or_t5(data):
    datamodule = LatentCacheDataModule(data["cache"], batch_size=2, num_workers=0, seed=0)
    module = DiTTrainingModule(**module_kwargs(vae=data["vae"], text_encoder=TEXT, use_latent_cache=True))
    losses = []

    class Keep(__import__("lightning.pytorch").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            assert pl_module.frozen.vae is None and pl_module.frozen.text_encoder is None

    callbacks = [Keep(), DataPositionCallback(max_failure_rate=0.01)]
    trainer(2, callbacks=callbacks, use_distributed_sampler=False).fit(module, datamodule=datamodule)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert datamodule.position.samples_seen == 4  # the frame-pack position callback drives the cache position too

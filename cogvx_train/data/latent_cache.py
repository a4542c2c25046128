"""Precomputed VAE posteriors and T5 embeddings, so a DiT stage trains without decoding video or holding VAE and T5.

    cogvx-data precompute manifest.jsonl --out /data/cache --vae-weights runs/vae_a1/... --num-frames 49 ...

Layout of a cache directory:

    index.json                    format/version, the config it was made with (VAE weights path + sha256, scaling
                                  factor, text encoder, num_frames, fps, resolutions, seed, ...), buckets, shards,
                                  and one record per sample (shard, offset, bucket, caption, manifest row, ...)
    shard-b{bucket}-{k}.safetensors   latents_mean, latents_logvar [N, 16, T', h, w] and text_embeds [N, L, D];
                                  every shard holds samples of ONE bucket, its records in its own metadata

The posterior MEAN and LOG-VARIANCE are stored, not a sample: the DiT re-samples z = mean + exp(logvar/2) eps every
step with the same keyed generator it uses on the fly, so cached and on-the-fly training see identical latents.
Latents are stored unscaled (the DiT multiplies by its scaling factor), so one cache serves any scaling factor.

Decoding and bucketing reuse the frame-pack dataset (same frame selection, resize-cover + centre crop, buckets
from the manifest). Each clip is cached once, with `start_mode` ('center' by default) and the fps drawn for
epoch 0: the random start/fps augmentation of on-the-fly training is traded for speed. Restartable: a finished
shard whose metadata carries the same config hash is kept when precompute runs again.

`LatentCacheDataModule` yields the frame-pack batch contract extended with latents_mean, latents_logvar and
text_embeds (no `video`), and uses the frame-pack BucketBatchSampler: the same deterministic, distributed,
world-size-independent, resumable batch order, driven by the same DataPosition.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from cogvx_train.config.errors import ConfigError
from cogvx_train.data.frame_pack import Bucket, BucketBatchSampler, DataPosition

log = logging.getLogger(__name__)

CACHE_FORMAT = "cogvx-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
POSITION_FORMAT = "cogvx-latent-cache-position"
TENSORS = ("latents_mean", "latents_logvar", "text_embeds")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------- precompute
def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_shard_records(path: Path, config_hash: str) -> list[dict[str, Any]] | None:
    """The sample records of a finished shard made with the same config, else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply redone
        return None
    if meta.get("config_hash") != config_hash:
        return None
    return json.loads(meta["samples"])


def precompute(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    num_frames: int,
    fps: float | Sequence[float] | None,
    resolutions: Sequence[Sequence[int]],
    batch_size: int = 4,
    shard_size: int = 256,
    device: str | torch.device = "cpu",
    use_images: bool = True,
    seed: int = 0,
    start_mode: str = "center",
    latent_dtype: str = "float32",
    chunk_frames: int | None = None,
    bf16_autocast: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every usable clip (and still, if use_images) of `manifest` into a cache in `out_dir`; returns the
    index path. vae / text_encoder: the `model.vae` / `model.text_encoder` groups as plain dicts (VAESpec /
    TextEncoderSpec fields). chunk_frames: encode in chunks of frames (bounded memory, same result). bf16_autocast:
    run VAE and T5 under bf16 autocast on CUDA (faster; latents then differ slightly from fp32 encoding)."""
    from cogvx_train.data.frame_pack import FramePackDataset, collate_frame_pack
    from cogvx_train.data.manifest import read_manifest
    from cogvx_train.dit.frozen_encoders import (
        FrozenEncoders,
        TextEncoderSpec,
        VAESpec,
        encode_video,
        weights_fingerprint,
    )

    if latent_dtype not in DTYPES:
        raise ValueError(f"latent_dtype={latent_dtype!r} is not one of {', '.join(DTYPES)}.")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be at least 1.")
    if num_workers < 0:
        raise ValueError(f"num_workers ({num_workers}) must be >= 0 decoding processes (0 decodes in this process).")
    vae_spec, text_spec = VAESpec.from_any(vae), TextEncoderSpec.from_any(text_encoder)
    out = Path(out_dir)
    manifest_path = Path(manifest).expanduser().resolve()
    table = read_manifest(manifest_path)
    rows = table.indices("ok", ("video", "image") if use_images else ("video",))
    if not rows:
        raise ValueError(f"manifest {manifest_path} has no usable rows to cache (use_images={use_images}).")
    dataset = FramePackDataset(table, rows, num_frames, resolutions, target_fps=fps, batch_size=batch_size,
                               seed=seed, start_mode=start_mode)
    encoders = FrozenEncoders.build(vae_spec, text_spec)
    config = {
        "manifest": str(manifest_path),
        "manifest_fingerprint": hashlib.sha1("\0".join(dataset.paths).encode()).hexdigest(),
        "vae": vae_spec.to_dict() | {"weights_fingerprint": weights_fingerprint(vae_spec.weights),
                                     "stored_scaling_factor": encoders.vae.scaling_factor},
        "scaling_factor": encoders.scaling_factor,
        "text_encoder": text_spec.to_dict() | {"embed_dim": encoders.text_encoder.embed_dim},
        "num_frames": int(num_frames), "fps": fps if fps is None or np.isscalar(fps) else list(fps),
        "resolutions": [list(map(int, hw)) for hw in resolutions], "use_images": bool(use_images),
        "seed": int(seed), "start_mode": start_mode, "latent_dtype": latent_dtype, "bf16_autocast": bool(bf16_autocast),
    }
    config_hash = _config_hash(config)
    index_path = out / INDEX_NAME
    if index_path.exists() and not overwrite:
        existing = json.loads(index_path.read_text())
        if existing.get("config_hash") == config_hash:
            log.info("latent cache %s is complete and matches this config; nothing to do", out)
            return index_path
        raise ValueError(f"{out} already holds a latent cache made with another config; choose a new output "
                         "directory or pass overwrite=True (--overwrite).")
    out.mkdir(parents=True, exist_ok=True)
    encoders.to(device)
    storage = DTYPES[latent_dtype]
    on_cuda = torch.device(device).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_autocast and on_cuda)

    plan = []  # (bucket, shard number, member indices)
    for b, members in enumerate(dataset.members):
        for k, start in enumerate(range(0, len(members), shard_size)):
            plan.append((b, k, members[start : start + shard_size]))
    shards, samples = [], []
    done = started = 0
    t0 = time.perf_counter()
    for b, k, members in plan:
        name = f"shard-b{b:02d}-{k:05d}.safetensors"
        records = _read_shard_records(out / name, config_hash)
        if records is None:
            records = _encode_shard(dataset, members, batch_size, encoders, encode_video, collate_frame_pack,
                                    out / name, config_hash, b, storage, chunk_frames, autocast, num_workers)
            started += len(members)
        shards.append({"file": name, "bucket": b, "count": len(records)})
        samples += [r | {"shard": len(shards) - 1, "offset": i} for i, r in enumerate(records)]
        done += len(members)
        if progress:
            rate = started / max(time.perf_counter() - t0, 1e-9)
            print(f"precompute: {done}/{len(dataset)} samples ({rate:.2f}/s)", flush=True)
    buckets = []
    for bucket in dataset.buckets:
        t_lat = (bucket.num_frames - 1) // encoders.vae.config.temporal_compression_ratio + 1
        s = encoders.vae.config.spatial_compression
        buckets.append(asdict(bucket) | {"latent_shape": [encoders.vae.config.latent_channels, t_lat,
                                                          bucket.height // s, bucket.width // s]})
    index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "config_hash": config_hash, "config": config,
             "buckets": buckets, "shards": shards, "num_samples": len(samples), "samples": samples,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _atomic_write_text(index_path, json.dumps(index) + "\n")
    return index_path


def _encode_shard(dataset, members, batch_size, encoders, encode_video, collate, path: Path, config_hash: str,
                  bucket: int, storage: torch.dtype, chunk_frames, autocast, num_workers) -> list[dict[str, Any]]:
    """Decode, encode and write one shard (atomically); returns its sample records."""
    from safetensors.torch import save_file

    keys = [[(0, int(i)) for i in members[s : s + batch_size]] for s in range(0, len(members), batch_size)]
    loader = DataLoader(dataset, batch_sampler=keys, collate_fn=collate, num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    records = []
    device = next(encoders.vae.parameters()).device
    for batch in loader:
        with torch.no_grad(), autocast:
            mean, logvar = encode_video(encoders.vae, batch["video"].to(device), chunk_frames)
            text = encoders.encode_text(batch["caption"])
        parts["latents_mean"].append(mean.to("cpu", storage))
        parts["latents_logvar"].append(logvar.to("cpu", storage))
        parts["text_embeds"].append(text.cpu())
        for i in range(len(batch["caption"])):
            records.append({"row": int(batch["index"][i]), "requested_row": int(batch["requested_index"][i]),
                            "caption": batch["caption"][i], "is_image": bool(batch["is_image"][i]),
                            "num_real_frames": int(batch["num_real_frames"][i]), "fps": float(batch["fps"][i]),
                            "path": batch["path"][i], "bucket": bucket})
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"config_hash": config_hash, "samples": json.dumps(records)})
    os.replace(tmp, path)
    return records


# ------------------------------------------------------------------------------------------------ dataset
def read_index(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir).expanduser() / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{path.parent} is not a finished latent cache (no {INDEX_NAME}); run `cogvx-data "
                          "precompute` (it resumes where it stopped).")
    try:
        index = json.loads(path.read_text())
    except ValueError:  # a half-written or foreign file: the sentence below
        index = {}
    index = index if isinstance(index, dict) else {}
    if index.get("format") != CACHE_FORMAT or not isinstance(index.get("version"), int) \
            or index["version"] > CACHE_VERSION:
        raise ConfigError(f"{path} is not a {CACHE_FORMAT} version <= {CACHE_VERSION} index; rebuild the cache "
                          "with this cogvx-train.")
    return index


class LatentCacheDataset(Dataset):
    """Cached samples addressed by the sampler's (epoch, index) keys. Shards are opened lazily per process and
    read one sample at a time (safetensors slices), so memory does not grow with the cache size."""

    def __init__(self, cache_dir: str | Path, sample_ids: Sequence[int] | None = None, batch_size: int = 1,
                 image_batch_size: int | None = None):
        self.cache_dir = Path(cache_dir).expanduser()
        index = read_index(self.cache_dir)
        self.config = index["config"]
        all_samples = index["samples"]
        ids = list(range(len(all_samples))) if sample_ids is None else list(sample_ids)
        self.samples = [all_samples[i] for i in ids]
        self.shard_files = [s["file"] for s in index["shards"]]
        image_batch_size = image_batch_size or batch_size
        fields = ("height", "width", "num_frames", "is_image")
        self.buckets = [Bucket(**{k: b[k] for k in fields},
                               batch_size=image_batch_size if b["is_image"] else batch_size) for b in index["buckets"]]
        self.latent_shapes = [tuple(b["latent_shape"]) for b in index["buckets"]]
        self.bucket_ids = np.asarray([s["bucket"] for s in self.samples], dtype=np.int64)
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _shard(self, k: int):
        if k not in self._open:
            from safetensors import safe_open

            self._open[k] = safe_open(str(self.cache_dir / self.shard_files[k]), framework="pt")
        return self._open[k]

    def __getstate__(self) -> dict[str, Any]:  # open shard handles do not cross into DataLoader workers
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index = int(key[1]) if isinstance(key, tuple) else int(key)
        s = self.samples[index]
        f = self._shard(s["shard"])
        out = {name: f.get_slice(name)[s["offset"] : s["offset"] + 1][0] for name in TENSORS}
        out["latents_mean"] = out["latents_mean"].float()
        out["latents_logvar"] = out["latents_logvar"].float()
        return out | {"caption": s["caption"], "is_image": s["is_image"], "num_real_frames": s["num_real_frames"],
                      "index": s["row"], "requested_index": s["requested_row"], "fps": s["fps"]}


def collate_latent_cache(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one bucket -> a batch: the frame-pack contract without `video`, plus the cached tensors."""
    shapes = {tuple(s["latents_mean"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must have one latent shape, got {sorted(shapes)}; batches come from one bucket.")
    batch = {name: torch.stack([s[name] for s in samples]) for name in TENSORS}
    return batch | {
        "caption": [s["caption"] for s in samples],
        "is_image": torch.tensor([s["is_image"] for s in samples], dtype=torch.bool),
        "num_real_frames": torch.tensor([s["num_real_frames"] for s in samples], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "requested_index": torch.tensor([s["requested_index"] for s in samples], dtype=torch.int64),
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    }


class _PositionedLoader(DataLoader):
    """Lightning treats a loader with state_dict/load_state_dict as resumable; the real position is the
    datamodule's DataPosition, restored before the loader is built."""

    def __init__(self, *args, position: DataPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict[str, Any]:
        return asdict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class LatentCacheDataModule(LightningDataModule):
    """Train/val loaders over a latent cache with the frame-pack sampling rules (see the module docstring).

    val_count: that many cached clips, chosen by a hash of their source path, are held out for validation.
    Trainer requirements as for FramePackDataModule: use_distributed_sampler=False and DataPositionCallback (it
    calls on_train_batch_consumed / on_train_epoch_finished).
    """

    def __init__(self, cache_dir: str | Path, batch_size: int, num_workers: int = 2, seed: int = 0, *,
                 image_batch_size: int | None = None, use_images: bool = True, image_ratio: float | None = None,
                 val_count: int = 0, drop_last: bool = True, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.cache_dir = Path(cache_dir).expanduser()
        self.index = read_index(self.cache_dir)
        if batch_size < 1 or (image_batch_size is not None and image_batch_size < 1):
            raise ValueError(f"batch sizes must be at least 1, got {batch_size} / {image_batch_size}.")
        if num_workers < 0 or val_count < 0:
            raise ValueError(f"num_workers ({num_workers}) and val_count ({val_count}) must be >= 0.")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither.")
        self.batch_size, self.image_batch_size = int(batch_size), image_batch_size
        self.num_workers, self.seed, self.use_images = int(num_workers), int(seed), bool(use_images)
        self.image_ratio, self.val_count, self.drop_last = image_ratio, int(val_count), bool(drop_last)
        self._rank_override = None if rank is None else (int(rank), int(world_size))
        self.position = DataPosition()
        self.train_dataset: LatentCacheDataset | None = None
        self.val_dataset: LatentCacheDataset | None = None
        self.train_sampler: BucketBatchSampler | None = None
        self._world_size = 1
        self._pending_state: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """What the cache was made with (VAE, scaling factor, text encoder, frames, fps, resolutions)."""
        return self.index["config"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        samples = self.index["samples"]
        ids = [i for i, s in enumerate(samples) if self.use_images or not s["is_image"]]
        videos = [i for i in ids if not samples[i]["is_image"]]
        val_ids: list[int] = []
        if self.val_count:
            if self.val_count >= len(videos):
                raise ValueError(f"holding out {self.val_count} validation clips leaves none of the {len(videos)} "
                                 "cached videos for training; lower val_count.")
            ranked = sorted(videos, key=lambda i: hashlib.sha1(samples[i]["path"].encode()).hexdigest())
            val_ids = sorted(ranked[: self.val_count])
            held = set(val_ids)
            ids = [i for i in ids if i not in held]
        self.train_dataset = LatentCacheDataset(self.cache_dir, ids, self.batch_size, self.image_batch_size)
        if val_ids:
            self.val_dataset = LatentCacheDataset(self.cache_dir, val_ids, self.batch_size, self.image_batch_size)
        log.info("latent cache %s: %d training samples, %d validation clips", self.cache_dir, len(ids), len(val_ids))

    def _rank_and_world(self) -> tuple[int, int]:
        if self._rank_override is not None:
            return self._rank_override
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return 0, 1

    def _loader_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "collate_fn": collate_latent_cache}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = True
        return kwargs

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank_and_world()
        self._world_size = world
        ds = self.train_dataset
        self.train_sampler = BucketBatchSampler(ds.bucket_ids, ds.buckets, seed=self.seed, num_replicas=world,
                                                rank=rank, shuffle=True, drop_last=self.drop_last,
                                                image_ratio=self.image_ratio if self.use_images else None,
                                                position=self.position)
        self._apply_pending_state()
        return _PositionedLoader(ds, batch_sampler=self.train_sampler, position=self.position, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        rank, world = self._rank_and_world()
        ds = self.val_dataset
        sampler = BucketBatchSampler(ds.bucket_ids, ds.buckets, seed=self.seed, num_replicas=world, rank=rank,
                                     shuffle=False, drop_last=False, fixed_epoch=0, pad_last_round=True)
        return DataLoader(ds, batch_sampler=sampler, **self._loader_kwargs())

    # ---- position (same contract as FramePackDataModule) ----
    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def on_train_batch_consumed(self, batch: dict[str, Any] | None = None, world_size: int | None = None,
                                max_failure_rate: float | None = None) -> None:
        """Advance the position by one global batch (called by DataPositionCallback after each step). Cached
        samples cannot fail to decode, so max_failure_rate has nothing to check here."""
        position = self.position
        position.consumed += int(world_size or self._world_size)
        position.steps_in_epoch += 1
        if isinstance(batch, dict) and "caption" in batch:
            position.samples_seen += len(batch["caption"])
        if self.train_sampler is not None and self.train_sampler.exhausted():
            position.set_epoch(position.epoch + 1)

    def on_train_epoch_finished(self, epoch: int) -> None:
        if self.position.epoch == epoch:
            self.position.set_epoch(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"format": POSITION_FORMAT, "version": 1, "seed": self.seed, "config_hash": self.index["config_hash"],
                "num_samples": self.index["num_samples"], **asdict(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != POSITION_FORMAT:
            raise ValueError(f"the checkpoint's datamodule state is not a {POSITION_FORMAT} (got "
                             f"{state.get('format')!r}); a run started on raw videos cannot resume on a cache.")
        for key in ("epoch", "consumed", "steps_in_epoch", "samples_seen", "failures"):
            setattr(self.position, key, int(state.get(key, 0)))
        self._pending_state = dict(state)
        if self.train_dataset is not None:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is None:
            return
        if state.get("seed") != self.seed or state.get("config_hash") != self.index["config_hash"]:
            log.warning("the seed or the latent cache changed since the checkpoint: continuing at epoch %d from its "
                        "first batch.", self.position.epoch)
            self.position.consumed = self.position.steps_in_epoch = 0


# ------------------------------------------------------------------------------------------------------ CLI
def _resolution(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 480x720, got {text!r}") from None
    return height, width


def add_precompute_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cogvx-data precompute` (wired into cli/data.py's SUBCOMMANDS)."""
    parser.add_argument("manifest", type=Path, help="manifest (.jsonl) of the clips to cache")
    parser.add_argument("--out", type=Path, required=True, help="cache directory to write (restartable)")
    parser.add_argument("--vae-size", default="cogvideox", help="VAE size (tiny, cogvideox, cogvideox-5b)")
    parser.add_argument("--vae-weights", help="vae-stage run dir / .ckpt or diffusers VAE dir (omit: random VAE, "
                                              "tests only)")
    parser.add_argument("--scaling-factor", type=float, help="recorded with the cache (default: the VAE's own)")
    parser.add_argument("--text-encoder", default="t5", choices=("t5", "tiny"))
    parser.add_argument("--text-encoder-path", help="local T5 directory (kind t5)")
    parser.add_argument("--max-length", type=int, default=226, help="text tokens (226 for CogVideoX)")
    parser.add_argument("--num-frames", type=int, default=49, help="frames per clip, 4k+1")
    parser.add_argument("--fps", type=float, action="append", help="target fps (repeat for a draw per clip); "
                                                                   "default 8")
    parser.add_argument("--resolution", type=_resolution, action="append", dest="resolutions",
                        help="HEIGHTxWIDTH bucket, repeatable (default 480x720)")
    parser.add_argument("--no-images", action="store_true", help="cache videos only")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-mode", default="center", choices=("center", "start", "random"))
    parser.add_argument("--latent-dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--chunk-frames", type=int, help="encode this many frames at a time (bounded memory)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for VAE and T5 on CUDA")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache made with another config")
    parser.add_argument("--no-progress", action="store_true")


def run_precompute(args: argparse.Namespace) -> int:
    from cogvx_train.config.weights_source import check_weights_source

    if args.vae_weights:  # before the manifest is read and the encoders are built
        if (problem := check_weights_source(args.vae_weights, f"--vae-weights {args.vae_weights}", "vae")):
            raise ValueError(problem)
    vae = {"size": args.vae_size, "weights": args.vae_weights, "scaling_factor": args.scaling_factor}
    text = {"kind": args.text_encoder, "path": args.text_encoder_path, "max_length": args.max_length}
    fps = args.fps or [8.0]
    index = precompute(args.manifest, args.out, vae=vae, text_encoder=text, num_frames=args.num_frames,
                       fps=fps[0] if len(fps) == 1 else fps, resolutions=args.resolutions or [(480, 720)],
                       batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                       use_images=not args.no_images, seed=args.seed, start_mode=args.start_mode,
                       latent_dtype=args.latent_dtype, chunk_frames=args.chunk_frames, bf16_autocast=args.bf16,
                       num_workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    info = read_index(index.parent)
    print(f"wrote {info['num_samples']} samples in {len(info['shards'])} shards to {index.parent}")
    return 0

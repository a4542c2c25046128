"""Frame pack (CogVideoX §5): bucketed batches of one shape, a deterministic resumable sampler, the datamodule.

- Buckets come from the manifest alone (width, height, kind), never from decoding: a video goes to the
  resolution whose aspect ratio is closest (in log space) and to the (resolution, num_frames) bucket; a still
  goes to the (resolution, T=1) image bucket. Each batch is drawn from one bucket, so it has one shape.
- The sampler builds, from (seed, epoch) only, the GLOBAL ordered list of batches (independent of the world
  size). Rank r of W takes global batches g0 + r, g0 + r + W, ... where g0 is the number of global batches
  already consumed in the epoch; the trailing incomplete round is dropped so every rank gets the same number of
  batches. Because the position is a global batch index, a run saved at one world size resumes at another with
  exactly the next batches.
- Every random choice of a sample (start frame, fps draw, replacement of a bad file) is a function of
  (seed, epoch, index[, attempt]), so the data does not depend on the number of workers or ranks.
- A file that fails at run time is logged, replaced by another sample of the same bucket, and reported in the
  batch (``requested_index != index``, ``failures``, ``failure_reasons``). ``DataPositionCallback`` counts
  consumed batches and failures in the main process and stops the run only when the failure rate passes
  ``max_failure_rate``.

The batch layout is the contract in docs/architecture.md. Trainer requirements: ``use_distributed_sampler=False``
(this module shards itself) and ``DataPositionCallback()`` in the callbacks.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from cogvx_train.config.errors import ConfigError
from cogvx_train.data.manifest import Manifest, check_files_present, read_manifest
from cogvx_train.data.video_io import (
    START_MODES,
    choose_start_index,
    decode_size,
    load_clip,
    read_frames,
    resize_cover_center_crop,
    sample_frame_indices,
)

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]  # (epoch, dataset index): what the sampler hands the dataset
MIN_SAMPLES_FOR_RATE = 100  # the failure rate is judged over at least this many samples
POSITION_FORMAT = "cogvx-frame-pack-position"

# ------------------------------------------------------------------------------------------------- validators


def check_num_frames(num_frames: int) -> int:
    """num_frames must be 4k+1: the causal VAE keeps the first frame and compresses the rest 4x in time."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
        try:
            low = max(1, 4 * ((int(num_frames) - 1) // 4) + 1)
            hint = f"; the nearest valid values are {low} and {low + 4}"
        except (TypeError, ValueError):
            hint = ""
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 49) because the VAE compresses time 4x after "
                         f"the first frame, got {num_frames!r}{hint}.")
    return num_frames


def check_resolution(hw: Sequence[int]) -> tuple[int, int]:
    """A resolution is [H, W], both positive multiples of 16 (the VAE divides by 8, the DiT patch by 2)."""
    try:
        height, width = (int(v) for v in hw)
        valid = height == hw[0] and width == hw[1]
    except (TypeError, ValueError):
        valid = False
    if not valid or height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(f"a resolution must be [H, W] with both sides positive multiples of 16, got {hw!r}"
                         + (f"; try [{max(16, round(height / 16) * 16)}, {max(16, round(width / 16) * 16)}]"
                            if valid else "") + ".")
    return height, width


def check_resolutions(resolutions: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """A non-empty list of distinct [H, W] resolutions (one aspect-ratio bucket each)."""
    if isinstance(resolutions, (str, bytes)) or not isinstance(resolutions, Sequence) or not resolutions:
        raise ValueError(f"resolutions must be a non-empty list of [H, W] pairs, got {resolutions!r}.")
    if len(resolutions) == 2 and all(isinstance(v, int) for v in resolutions):
        raise ValueError(f"resolutions is a list of [H, W] pairs; write [{list(resolutions)}], not {list(resolutions)}.")
    checked = [check_resolution(hw) for hw in resolutions]
    if len(set(checked)) != len(checked):
        raise ValueError(f"resolutions must be distinct, got {[list(hw) for hw in checked]}.")
    return checked


def check_batch_size(batch_size: int, name: str = "batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}.")
    return batch_size


def check_target_fps(target_fps: float | Sequence[float] | None) -> tuple[float, ...] | None:
    """None (keep the source rate), one rate, or a list of rates drawn per sample (e.g. [8, 16] for VAE A1)."""
    if target_fps is None:
        return None
    values = [target_fps] if isinstance(target_fps, (int, float)) else list(target_fps)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
        raise ValueError(f"target_fps must be a positive number, a non-empty list of them, or None (source rate), "
                         f"got {target_fps!r}.")
    return tuple(float(v) for v in values)


def usable_rows(manifest: Manifest, use_images: bool) -> tuple[list[int], list[int]]:
    """The rows a run reads (ok videos, plus ok stills with use_images) and the ok videos among them. A
    manifest no run could use (no such row, or none of the first ones on disk) is a ConfigError: one sentence."""
    rows = manifest.indices("ok", ("video", "image") if use_images else ("video",))
    videos = [r for r in rows if manifest.entries[r].kind == "video"]
    if not rows:
        n_img = len(manifest.indices("ok", ("image",)))
        raise ConfigError(f"manifest {manifest.path} has no usable rows ({len(videos)} ok videos, {n_img} ok images, "
                          f"use_images={use_images}); see `cogvx-data summary {manifest.path}`.")
    check_files_present(manifest, rows)
    return rows, videos


def check_holdout(count: int, num_videos: int) -> None:
    """Validation clips are held out of the training videos: some must be left to train on."""
    if count >= num_videos:
        raise ConfigError(f"holding out {count} validation clips would leave none of the {num_videos} ok videos for "
                          "training; lower num_val_clips/val_fraction or give a val_manifest.")


def check_fraction(value: float | None, name: str, allow_one: bool = False) -> float | None:
    if value is None:
        return None
    upper_ok = value <= 1 if allow_one else value < 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not upper_ok:
        raise ValueError(f"{name} must be a number in [0, {'1]' if allow_one else '1)'}, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class Bucket:
    """One batch shape: [batch_size, 3, num_frames, height, width]."""

    height: int
    width: int
    num_frames: int
    is_image: bool
    batch_size: int

    def __str__(self) -> str:
        return f"{'image' if self.is_image else 'video'} {self.num_frames}x{self.height}x{self.width}"


def closest_resolution(width: int, height: int, resolutions: Sequence[Sequence[int]]) -> int:
    """Index of the [H, W] resolution whose aspect ratio is closest to width/height (log distance, first wins)."""
    aspect = math.log(width / height)
    distances = [abs(math.log(w / h) - aspect) for h, w in resolutions]
    return int(np.argmin(distances))


# ---------------------------------------------------------------------------------------------------- dataset


class FramePackDataset(Dataset):
    """Manifest rows -> training samples. Items are addressed by ``(epoch, index)`` keys from the sampler.

    Only manifest columns are kept (paths, captions, sizes, frame counts), so the dataset pickles cheaply into
    DataLoader workers. ``start_mode`` is 'random' for training and 'center' or 'start' for validation.
    """

    def __init__(
        self,
        manifest: Manifest,
        rows: Sequence[int],
        num_frames: int,
        resolutions: Sequence[Sequence[int]],
        *,
        target_fps: float | Sequence[float] | None = 8.0,
        batch_size: int = 1,
        image_batch_size: int | None = None,
        seed: int = 0,
        start_mode: str = "random",
        max_replacement_attempts: int = 8,
        decode_threads: int = 1,
        reduced_decode: bool = True,
    ):
        self.num_frames = check_num_frames(num_frames)
        self.resolutions = check_resolutions(resolutions)
        self.target_fps = check_target_fps(target_fps)
        if start_mode not in START_MODES:
            raise ValueError(f"start_mode must be one of {START_MODES}, got {start_mode!r}.")
        if max_replacement_attempts < 0:
            raise ValueError(f"max_replacement_attempts must be >= 0, got {max_replacement_attempts}.")
        self.seed, self.start_mode = int(seed), start_mode
        self.max_replacement_attempts = int(max_replacement_attempts)
        self.decode_threads, self.reduced_decode = int(decode_threads), reduced_decode
        check_batch_size(batch_size)
        image_batch_size = check_batch_size(image_batch_size or batch_size, "image_batch_size")

        entries = [manifest.entries[r] for r in rows]
        for row, e in zip(rows, entries):
            if e.status != "ok" or e.kind not in ("video", "image") or not e.width or not e.height:
                raise ValueError(f"manifest row {row} ({e.path}) is not an ok video/image with a size.")
            if e.kind == "video" and (not e.num_frames or not e.fps):
                raise ValueError(f"manifest row {row} ({e.path}) is a video without num_frames/fps.")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = [str(manifest.resolve(e)) for e in entries]
        self.captions = [e.caption for e in entries]
        self.is_image = np.asarray([e.kind == "image" for e in entries], dtype=bool)
        self.sizes = np.asarray([(e.height, e.width) for e in entries], dtype=np.int64).reshape(-1, 2)
        self.source_frames = np.asarray([e.num_frames or 1 for e in entries], dtype=np.int64)
        self.source_fps = np.asarray([e.fps or 0.0 for e in entries], dtype=np.float64)

        # bucket = (resolution, kind); only non-empty buckets are kept, videos first
        resolution_of = [closest_resolution(e.width, e.height, self.resolutions) for e in entries]
        keys = sorted({(bool(img), r) for img, r in zip(self.is_image, resolution_of)})
        self.buckets = [Bucket(self.resolutions[r][0], self.resolutions[r][1], 1 if img else self.num_frames, img,
                               image_batch_size if img else batch_size) for img, r in keys]
        bucket_of_key = {key: b for b, key in enumerate(keys)}
        self.bucket_ids = np.asarray([bucket_of_key[(bool(img), r)] for img, r in zip(self.is_image, resolution_of)],
                                     dtype=np.int64)
        self.members = [np.flatnonzero(self.bucket_ids == b) for b in range(len(self.buckets))]
        self._member_pos = np.zeros(len(rows), dtype=np.int64)
        for members in self.members:
            self._member_pos[members] = np.arange(len(members))

    def __len__(self) -> int:
        return len(self.rows)

    def bucket_sizes(self) -> dict[str, int]:
        return {str(b): len(m) for b, m in zip(self.buckets, self.members)}

    def replacement(self, epoch: int, index: int, attempt: int) -> int:
        """Deterministic stand-in for a failed sample: another member of the same bucket, a function of
        (seed, epoch, index, attempt) only."""
        members = self.members[self.bucket_ids[index]]
        if len(members) == 1:
            return index
        rng = np.random.default_rng([self.seed, epoch, index, attempt, 1])
        k = int(rng.integers(len(members) - 1))
        k += k >= self._member_pos[index]  # skip the failed sample itself
        return int(members[k])

    def load(self, epoch: int, index: int) -> dict[str, Any]:
        """One sample without replacement: raises if the file cannot be read."""
        bucket = self.buckets[self.bucket_ids[index]]
        target_hw = (bucket.height, bucket.width)
        src_hw = tuple(int(v) for v in self.sizes[index])
        path = self.paths[index]
        if bucket.is_image:
            frames = read_frames(path, [0], size=decode_size(src_hw, target_hw) if self.reduced_decode else None)
            video = resize_cover_center_crop(frames, target_hw)
            indices, num_real, fps = np.zeros(1, dtype=np.int64), 1, 0.0
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            fps = None
            if self.target_fps is not None:
                fps = self.target_fps[int(rng.integers(len(self.target_fps)))] if len(self.target_fps) > 1 \
                    else self.target_fps[0]
            n_src, src_fps = int(self.source_frames[index]), float(self.source_fps[index])
            start = choose_start_index(n_src, src_fps, fps, bucket.num_frames, self.start_mode, rng)
            selection = sample_frame_indices(n_src, src_fps, fps, bucket.num_frames, start_index=start)
            video = load_clip(path, selection.indices, target_hw, src_hw=src_hw, num_threads=self.decode_threads,
                              reduced_decode=self.reduced_decode)
            indices, num_real = selection.indices, selection.num_real
            fps = src_fps if fps is None else fps
        expected = (3, bucket.num_frames, bucket.height, bucket.width)
        if tuple(video.shape) != expected:
            raise ValueError(f"{path} gave a clip of shape {tuple(video.shape)}, expected {expected}.")
        return {
            "video": video,
            "num_real_frames": num_real,
            "is_image": bool(bucket.is_image),
            "caption": self.captions[index],
            "index": int(self.rows[index]),
            "frame_indices": torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)),
            "fps": float(fps),
            "path": path,
        }

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        epoch, index = int(key[0]), int(key[1])
        reasons: list[str] = []
        candidate = index
        for attempt in range(self.max_replacement_attempts + 1):
            try:
                sample = self.load(epoch, candidate)
                break
            except Exception as exc:  # any decode/IO error: this file is replaced, never fatal on its own
                reason = f"{self.paths[candidate]}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                reasons.append(reason)
                log.warning("could not load a sample (%s); replacing it with another sample of bucket %s",
                            reason, self.buckets[self.bucket_ids[index]])
                candidate = self.replacement(epoch, index, attempt + 1)
        else:
            raise RuntimeError(f"sample {int(self.rows[index])} and {self.max_replacement_attempts} replacements from "
                               f"bucket {self.buckets[self.bucket_ids[index]]} all failed to load; last error: "
                               f"{reasons[-1]}")
        sample["requested_index"] = int(self.rows[index])
        sample["failures"] = len(reasons)
        sample["failure_reasons"] = "; ".join(reasons)
        return sample


def _stack_videos(videos: list[torch.Tensor]) -> torch.Tensor:
    if get_worker_info() is not None:
        return default_collate(videos)
    out = torch.from_numpy(np.empty((len(videos), *videos[0].shape), dtype=np.float32))
    return torch.stack(videos, out=out)


def collate_frame_pack(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one bucket -> the batch of docs/architecture.md (one shape per batch).

    Inside a DataLoader worker the videos are stacked straight into shared memory (``default_collate`` does; a
    plain ``torch.stack`` would be copied into shared memory once more on the way to the main process); in the
    main process into a numpy-allocated buffer (huge pages: cheaper first touch for hundreds of MB).
    """
    return batch_as_tensors(_collate(samples))


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The batch with its small per-sample fields as numpy arrays (the loaders' collate_fn, see batch_as_tensors)."""
    shapes = {tuple(s["video"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must have one shape, got {sorted(shapes)}; batches must come from one bucket.")

    def field(name: str, dtype) -> np.ndarray:
        return np.array([s[name] for s in samples], dtype=dtype)

    return {
        "video": _stack_videos([s["video"] for s in samples]),
        "num_real_frames": field("num_real_frames", np.int64),
        "is_image": field("is_image", np.bool_),
        "caption": [s["caption"] for s in samples],
        "index": field("index", np.int64),
        "requested_index": field("requested_index", np.int64),
        "frame_indices": np.stack([np.asarray(s["frame_indices"]) for s in samples]),
        "fps": field("fps", np.float32),
        "path": [s["path"] for s in samples],
        "failures": field("failures", np.int64),
        "failure_reasons": [s["failure_reasons"] for s in samples],
    }


def batch_as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """numpy fields -> tensors (zero-copy). A batch crosses from a worker to the training process with its small
    fields as numpy arrays because every tensor a worker sends costs a shared-memory file-descriptor round trip
    with that worker (~0.6 ms each on 2 CPU cores, measured; 7 of a batch's 8 tensors were such fields), while
    numpy arrays travel inside the pickle. The loaders convert them back, so consumers see tensors."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _TensorBatchLoader(DataLoader):
    """A DataLoader whose batches come out with tensors only (see batch_as_tensors); the validation loader."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(batch_as_tensors, super().__iter__())


# ---------------------------------------------------------------------------------------------------- sampler


@dataclass
class DataPosition:
    """Where training stands in the data. Shared by the datamodule, its sampler and its checkpoint state."""

    epoch: int = 0
    consumed: int = 0  # GLOBAL batches consumed in `epoch` (all ranks together)
    steps_in_epoch: int = 0  # batches this rank consumed in `epoch` (what Lightning counts)
    samples_seen: int = 0  # samples this rank received in the run (for the failure rate)
    failures: int = 0  # of those, how many were replacements for a failed file

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.steps_in_epoch = int(epoch), 0, 0


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Deterministic, distributed, resumable batches of one bucket each (see the module docstring).

    ``image_ratio`` (None: every still once per epoch) makes that fraction of all batches image batches, cycling
    through the stills. ``fixed_epoch`` pins the epoch (validation: the same clips, starts and fps every time).
    ``pad_last_round`` repeats batches from the start so every rank gets the same count (validation) instead of
    dropping the incomplete last round (training).
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        buckets: Sequence[Bucket],
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        image_ratio: float | None = None,
        position: DataPosition | None = None,
        fixed_epoch: int | None = None,
        pad_last_round: bool = False,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}.")
        self.image_ratio = check_fraction(image_ratio, "image_ratio")
        self.buckets = list(buckets)
        bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.members = [np.flatnonzero(bucket_ids == b) for b in range(len(self.buckets))]
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.shuffle, self.drop_last, self.pad_last_round = shuffle, drop_last, pad_last_round
        self.fixed_epoch = fixed_epoch
        self.position = position if position is not None else DataPosition()
        self._cache: dict[int, list[np.ndarray]] = {}  # the last two epochs' global batches
        total = len(self.global_batches(self.epoch))
        if total == 0:
            raise ConfigError(f"no complete batch can be formed: bucket sizes {self.bucket_sizes()} are all below "
                              f"their batch sizes; lower batch_size (or pass drop_last=False).")
        if total < self.num_replicas and not pad_last_round:
            raise ConfigError(f"an epoch has only {total} batches, fewer than the {self.num_replicas} ranks; "
                              f"lower batch_size or use fewer ranks.")
        starved = [str(b) for b, m in zip(self.buckets, self.members) if drop_last and len(m) < b.batch_size]
        if starved:
            log.warning("buckets with fewer samples than their batch size are never used: %s", ", ".join(starved))

    @property
    def epoch(self) -> int:
        return self.fixed_epoch if self.fixed_epoch is not None else self.position.epoch

    @property
    def sampler(self) -> "BucketBatchSampler":
        """Lightning calls ``set_epoch`` on ``batch_sampler.sampler``; this sampler is its own."""
        return self

    def bucket_sizes(self) -> dict[str, int]:
        return {str(b): len(m) for b, m in zip(self.buckets, self.members)}

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.position.set_epoch(epoch)

    def _chunk(self, order: np.ndarray, batch_size: int) -> list[np.ndarray]:
        stop = len(order) - len(order) % batch_size if self.drop_last else len(order)
        return [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    def _bucket_batches(self, rng: np.random.Generator | None, images: bool) -> list[np.ndarray]:
        batches = []
        for bucket, members in zip(self.buckets, self.members):
            if bucket.is_image == images:
                order = rng.permutation(members) if rng is not None else members
                batches += self._chunk(order, bucket.batch_size)
        return batches

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches in global order (dataset indices), the same for every world size."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        video = self._bucket_batches(rng, images=False)
        image = self._bucket_batches(rng, images=True)
        if self.image_ratio is not None:
            wanted = round(self.image_ratio / (1.0 - self.image_ratio) * len(video)) if video else len(image)
            pool: list[np.ndarray] = []
            while image and len(pool) < wanted:  # cycle through fresh passes over the stills
                passes = self._bucket_batches(rng, images=True)
                if rng is not None:
                    passes = [passes[k] for k in rng.permutation(len(passes))]
                pool += passes
            image = pool[:wanted]
        batches = video + image
        if rng is not None:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        # two epochs: a stream() running ahead into the next epoch must not evict the one being consumed
        self._cache = {e: b for e, b in self._cache.items() if e == epoch - 1} | {epoch: batches}
        return batches

    def _rank_batches(self) -> tuple[int, list[np.ndarray], int]:
        """(epoch, global batches, first global batch) of the iteration that starts now."""
        epoch = self.epoch
        batches = self.global_batches(epoch)
        start = 0 if self.fixed_epoch is not None else min(self.position.consumed, len(batches))
        return epoch, batches, start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        """This rank's batches of the current epoch, from the current position."""
        epoch, batches, start = self._rank_batches()
        yield from self._epoch_batches(epoch, batches, start)

    def _epoch_batches(self, epoch: int, batches: list[np.ndarray], start: int) -> Iterator[list[SampleKey]]:
        if self.pad_last_round and len(batches) % self.num_replicas:  # repeat from the start: equal counts
            padded = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = [batches[k % len(batches)] for k in range(padded)]
        rounds = (len(batches) - start) // self.num_replicas
        for k in range(rounds):
            batch = batches[start + k * self.num_replicas + self.rank]
            yield [(epoch, int(i)) for i in batch]

    def stream(self) -> Iterator[list[SampleKey]]:
        """This rank's batches from the current position on, epoch after epoch, without end: exactly what
        iterating the sampler once per epoch gives, as one sequence. A DataLoader over it keeps its workers decoding
        across epoch boundaries (``_PositionedDataLoader``). The position is read once, here; the stream never
        changes it."""
        if self.fixed_epoch is not None:
            raise ValueError("a sampler with a fixed epoch (validation) repeats one epoch; iterate it instead.")
        epoch, batches, start = self._rank_batches()
        while True:
            yield from self._epoch_batches(epoch, batches, start)
            epoch, start = epoch + 1, 0
            batches = self.global_batches(epoch)

    def remaining(self) -> int:
        """Batches this rank has left in the current epoch at the current position."""
        _, batches, start = self._rank_batches()
        return (len(batches) - start) // self.num_replicas

    def __len__(self) -> int:
        """Batches this rank sees in a whole epoch. After a resume at another world size the resumed epoch may be
        longer than that (counting what was consumed before), and Lightning must not stop it early."""
        total = len(self.global_batches(self.epoch))
        if self.pad_last_round:
            return math.ceil(total / self.num_replicas)
        full = total // self.num_replicas
        if self.fixed_epoch is None and self.position.consumed > 0:
            resumed = self.position.steps_in_epoch + max(0, total - self.position.consumed) // self.num_replicas
            return max(full, resumed)
        return full

    def exhausted(self) -> bool:
        """No full round of batches is left in the current epoch."""
        total = len(self.global_batches(self.epoch))
        return (total - self.position.consumed) // self.num_replicas == 0


class _EpochStream:
    """The index sampler of ``_PositionedDataLoader``: its batch sampler's ``stream()``, with one epoch's length."""

    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return self.sampler.stream()

    def __len__(self) -> int:
        return len(self.sampler)


class _PositionedDataLoader(DataLoader):
    """The training loader: one epoch per ``iter()``, like any DataLoader, but its workers never stop at an epoch's
    end, so the next epoch's first batches are decoded while the current epoch's last ones train.

    Underneath runs ONE iterator over ``BucketBatchSampler.stream()`` (every epoch's batches in order, from the
    position at which it was started); each ``iter()`` hands out the ``remaining()`` batches of the current epoch
    from it. It is restarted from the datamodule's position whenever that position is not where the stream stands
    (a run resumed or rolled back, an epoch left early), so the batches are always exactly the sampler's.

    Lightning treats it as resumable (it has state_dict/load_state_dict) and so does not warn that a mid-epoch
    resume is unreliable. The authoritative position is the datamodule's state, which Lightning restores before it
    builds the loader; the copy Lightning keeps in its loop state is informational only."""

    def __init__(self, *args, position: DataPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position
        self._stream_at: tuple[int, int] | None = None  # (epoch, consumed) of the stream's next batch

    @property
    def _index_sampler(self):
        return _EpochStream(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        here = (self._position.epoch, self._position.consumed)
        if self._iterator is None or self._stream_at != here:
            if isinstance(self._iterator, _MultiProcessingDataLoaderIter):
                self._iterator._shutdown_workers()
            self._iterator = self._get_iterator()  # Lightning's teardown shuts its workers down and sets it to None
        count = self.batch_sampler.remaining()
        # where the stream stands once this epoch is handed out (the position DataPositionCallback will report)
        self._stream_at = (here[0] + 1, 0) if count == 0 else here
        return self._one_epoch(self._iterator, here[0], count)

    def _one_epoch(self, stream, epoch: int, count: int) -> Iterator[dict[str, Any]]:
        step = self.batch_sampler.num_replicas  # global batches per round
        for k in range(1, count + 1):
            batch = next(stream)
            self._stream_at = (epoch + 1, 0) if k == count else (epoch, self._stream_at[1] + step)
            yield batch_as_tensors(batch)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None  # FramePackDataModule.load_state_dict already restored (and checked) the position


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding parallelism comes from the workers, not from intra-op threads


def held_out_rows(manifest: Manifest, rows: Sequence[int], count: int) -> list[int]:
    """``count`` rows chosen by a hash of their path: the same clips whatever the seed, order or world size."""
    ranked = sorted(rows, key=lambda r: hashlib.sha1(manifest.entries[r].path.encode("utf-8")).hexdigest())
    return sorted(ranked[:count])


def _fingerprint(dataset: FramePackDataset) -> str:
    digest = hashlib.sha1()
    for path in dataset.paths:
        digest.update(path.encode("utf-8") + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- datamodule


class FramePackDataModule(LightningDataModule):
    """Train and validation loaders over a manifest; see docs/architecture.md for the batch layout.

    Arguments (plain values, checked here with one sentence per mistake):
        manifest: path of the training manifest (``cogvx-data manifest`` output).
        num_frames: frames per video sample, 4k+1. resolutions: list of [H, W] (multiples of 16), one aspect
            bucket each. batch_size: video samples per batch.
        target_fps: the rate frames are sampled at; a list draws one per sample per epoch; None keeps the source
            rate.
        val_manifest / num_val_clips / val_fraction: validation clips. With ``val_manifest``: ``num_val_clips``
            of its videos (0: all), chosen by a hash of their path. Without: ``num_val_clips`` (or
            ``val_fraction``) of the training videos, chosen the same way and left out of training. Validation
            uses ``val_start`` ('center' or 'start'), no shuffle, the same clips every time, and pads the last
            round so all ranks run the same number of batches.
        use_images / image_batch_size / image_ratio: train on stills as 1-frame videos, in their own batches;
            ``image_ratio`` is the fraction of batches that are image batches (None: each still once per epoch).
        max_failure_rate: stop the run when more than this fraction of samples had to be replaced (judged over at
            least MIN_SAMPLES_FOR_RATE samples; one bad file never stops a run).
        rank / world_size: override what the Trainer or torch.distributed says (tests, custom loops); process
            ranks, like theirs.
        context_parallel_size: consecutive processes [g*c, (g+1)*c) that share every clip (VAE stage A2): they
            receive the same batches, as data-parallel rank rank // c of world_size // c. The data position stays
            a global batch index, so resuming at another world or context-parallel size continues exactly.
    """

    def __init__(
        self,
        manifest: str | Path,
        num_frames: int,
        resolutions: Sequence[Sequence[int]],
        batch_size: int,
        target_fps: float | Sequence[float] | None = 8.0,
        *,
        val_manifest: str | Path | None = None,
        num_val_clips: int = 0,
        val_fraction: float = 0.0,
        val_batch_size: int | None = None,
        val_start: str = "center",
        use_images: bool = False,
        image_batch_size: int | None = None,
        image_ratio: float | None = None,
        num_workers: int = 2,
        val_num_workers: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        max_failure_rate: float = 0.01,
        max_replacement_attempts: int = 8,
        decode_threads: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        context_parallel_size: int = 1,
    ):
        super().__init__()
        self.manifest_path = Path(manifest)
        if not self.manifest_path.is_file():
            raise ValueError(f"manifest {self.manifest_path} does not exist; build it with "
                             f"`cogvx-data manifest FOLDER --out {self.manifest_path}`.")
        self.val_manifest_path = Path(val_manifest) if val_manifest is not None else None
        if self.val_manifest_path is not None and not self.val_manifest_path.is_file():
            raise ValueError(f"val_manifest {self.val_manifest_path} does not exist.")
        self.num_frames = check_num_frames(num_frames)
        self.resolutions = check_resolutions(resolutions)
        self.batch_size = check_batch_size(batch_size)
        self.target_fps = check_target_fps(target_fps)
        self.val_batch_size = check_batch_size(val_batch_size or batch_size, "val_batch_size")
        self.image_batch_size = check_batch_size(image_batch_size or batch_size, "image_batch_size")
        self.image_ratio = check_fraction(image_ratio, "image_ratio")
        self.val_fraction = check_fraction(val_fraction, "val_fraction")
        if isinstance(num_val_clips, bool) or not isinstance(num_val_clips, int) or num_val_clips < 0:
            raise ValueError(f"num_val_clips must be an integer >= 0, got {num_val_clips!r}.")
        if self.val_fraction and (num_val_clips > 0 or self.val_manifest_path is not None):
            raise ValueError("val_fraction holds out a share of the training manifest; do not combine it with "
                             "num_val_clips or val_manifest.")
        if val_start not in ("center", "start"):
            raise ValueError(f"val_start must be 'center' or 'start', got {val_start!r}.")
        self.max_failure_rate = check_fraction(max_failure_rate, "max_failure_rate", allow_one=True)
        for name, value in (("num_workers", num_workers), ("max_replacement_attempts", max_replacement_attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0: FFmpeg picks), got {decode_threads}.")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither.")
        if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
                or context_parallel_size < 1:
            raise ValueError(f"context_parallel_size must be a positive integer, got {context_parallel_size!r}.")
        self.context_parallel_size = context_parallel_size
        self.num_val_clips, self.val_start, self.use_images = num_val_clips, val_start, bool(use_images)
        self.num_workers = num_workers
        self.val_num_workers = num_workers if val_num_workers is None else val_num_workers
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self.max_replacement_attempts, self.decode_threads = max_replacement_attempts, decode_threads
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.persistent_workers = persistent_workers
        self._rank_override = None if rank is None else (int(rank), int(world_size))

        self.position = DataPosition()
        self.train_dataset: FramePackDataset | None = None
        self.val_dataset: FramePackDataset | None = None
        self.train_sampler: BucketBatchSampler | None = None
        self._world_size = 1
        self._pending_state: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._recent_failures: collections.deque[str] = collections.deque(maxlen=5)

    # ---------------------------------------------------------------------------------------------- building

    def _dataset(self, manifest: Manifest, rows: Sequence[int], batch_size: int, start_mode: str) -> FramePackDataset:
        return FramePackDataset(manifest, rows, self.num_frames, self.resolutions, target_fps=self.target_fps,
                                batch_size=batch_size, image_batch_size=self.image_batch_size, seed=self.seed,
                                start_mode=start_mode, max_replacement_attempts=self.max_replacement_attempts,
                                decode_threads=self.decode_threads)

    def setup(self, stage: str | None = None) -> None:
        """Read the manifest(s) and build the datasets (once; no decoding happens here)."""
        if self.train_dataset is not None:
            return
        manifest = read_manifest(self.manifest_path)
        rows, videos = usable_rows(manifest, self.use_images)
        val_rows: list[int] = []
        val_manifest = manifest
        if self.val_manifest_path is not None:
            val_manifest = read_manifest(self.val_manifest_path)
            val_rows, _ = usable_rows(val_manifest, use_images=False)  # validation clips are videos
            if self.num_val_clips:
                val_rows = held_out_rows(val_manifest, val_rows, self.num_val_clips)
        elif self.num_val_clips or self.val_fraction:
            count = self.num_val_clips or max(1, round(self.val_fraction * len(videos)))
            check_holdout(count, len(videos))
            val_rows = held_out_rows(manifest, videos, count)
            held = set(val_rows)
            rows = [r for r in rows if r not in held]
        self.train_dataset = self._dataset(manifest, rows, self.batch_size, "random")
        self._fingerprint = _fingerprint(self.train_dataset)  # once: state_dict() runs at every checkpoint
        if val_rows:
            self.val_dataset = self._dataset(val_manifest, val_rows, self.val_batch_size, self.val_start)
        log.info("frame pack: %d training samples in buckets %s; %d validation clips", len(self.train_dataset),
                 self.train_dataset.bucket_sizes(), len(val_rows))

    def _process_rank_and_world(self) -> tuple[int, int]:
        if self._rank_override is not None:
            return self._rank_override
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _data_parallel_world(self, world: int) -> int:
        """Ranks that get different batches: the processes, counting each context-parallel group once."""
        c = self.context_parallel_size
        if world % c:
            raise ValueError(f"context_parallel_size={c} does not divide the world size {world}; launch a multiple "
                             f"of {c} ranks.")
        return world // c

    def _rank_and_world(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel world): what the batch sampler shards over."""
        rank, world = self._process_rank_and_world()
        return rank // self.context_parallel_size, self._data_parallel_world(world)

    def _loader_kwargs(self, num_workers: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_workers": num_workers, "collate_fn": _collate,
                                  "pin_memory": self.pin_memory}
        if num_workers > 0:
            kwargs["worker_init_fn"] = _worker_init
            kwargs["persistent_workers"] = True if self.persistent_workers is None else self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def _check_trainer(self, world_size: int) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError("FramePackDataModule shards batches across ranks itself; build the Trainer with "
                             "use_distributed_sampler=False.")
        if not any(isinstance(cb, DataPositionCallback) for cb in trainer.callbacks):
            log.warning("no DataPositionCallback among the Trainer callbacks: a resumed run restarts its epoch and "
                        "the data failure rate is not checked.")

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._rank_and_world()
        self._check_trainer(world)
        self._world_size = world
        dataset = self.train_dataset
        self.train_sampler = BucketBatchSampler(
            dataset.bucket_ids, dataset.buckets, seed=self.seed, num_replicas=world, rank=rank, shuffle=True,
            drop_last=self.drop_last, image_ratio=self.image_ratio if self.use_images else None,
            position=self.position)
        self._apply_pending_state()
        return _PositionedDataLoader(dataset, batch_sampler=self.train_sampler, position=self.position,
                                     **self._loader_kwargs(self.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        rank, world = self._rank_and_world()
        sampler = BucketBatchSampler(self.val_dataset.bucket_ids, self.val_dataset.buckets, seed=self.seed,
                                     num_replicas=world, rank=rank, shuffle=False, drop_last=False,
                                     fixed_epoch=0, pad_last_round=True)
        return _TensorBatchLoader(self.val_dataset, batch_sampler=sampler,
                                  **self._loader_kwargs(self.val_num_workers))

    # -------------------------------------------------------------------------------------- position & state

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def on_train_batch_consumed(self, batch: dict[str, Any] | None = None, world_size: int | None = None,
                                max_failure_rate: float | None = None) -> None:
        """Called once per training batch after the step (by DataPositionCallback): advance the position, count
        replaced samples and stop the run if the failure rate passes ``max_failure_rate`` (default: this
        datamodule's). ``world_size``: processes in the job (each context-parallel group consumed one batch)."""
        position = self.position
        position.consumed += self._data_parallel_world(int(world_size)) if world_size else self._world_size
        position.steps_in_epoch += 1
        if self.train_sampler is not None and self.train_sampler.exhausted():
            position.set_epoch(position.epoch + 1)  # so a checkpoint taken now resumes at the next epoch
        reasons = batch.get("failure_reasons") if isinstance(batch, dict) else None
        if reasons is None:
            return
        failed = [r for r in reasons if r]
        position.samples_seen += len(reasons)
        position.failures += len(failed)
        self._recent_failures.extend(failed)
        rate = self.max_failure_rate if max_failure_rate is None else max_failure_rate
        limit = max(1.0, rate * max(position.samples_seen, MIN_SAMPLES_FOR_RATE))
        if position.failures > limit:
            raise RuntimeError(
                f"{position.failures} of {position.samples_seen} samples had to be replaced because their files "
                f"failed to load, more than max_failure_rate={rate:g}; recent failures: "
                f"{' | '.join(self._recent_failures)}. Fix or drop these files (rebuild the manifest with "
                f"`cogvx-data manifest`) or raise max_failure_rate.")

    def on_train_epoch_finished(self, epoch: int) -> None:
        """Called at the end of a training epoch: the next checkpoint should resume at the next epoch."""
        if self.position.epoch == epoch:
            self.position.set_epoch(epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        state = {"format": POSITION_FORMAT, "version": 1, "seed": self.seed, **asdict(self.position)}
        if self.train_dataset is not None:
            state["fingerprint"] = self._fingerprint
            state["num_samples"] = len(self.train_dataset)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != POSITION_FORMAT:
            raise ValueError(f"the checkpoint's datamodule state is not a {POSITION_FORMAT} (got {state.get('format')!r}).")
        self.position.epoch = int(state["epoch"])
        self.position.consumed = int(state["consumed"])
        self.position.steps_in_epoch = int(state["steps_in_epoch"])
        self.position.samples_seen = int(state.get("samples_seen", 0))
        self.position.failures = int(state.get("failures", 0))
        self._pending_state = dict(state)
        if self.train_dataset is not None:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        """Check a loaded position against the data; if the data or seed changed, restart the epoch."""
        state, self._pending_state = self._pending_state, None
        if state is None or self.train_dataset is None:
            return
        changed = []
        if state.get("seed") != self.seed:
            changed.append(f"seed {state.get('seed')} -> {self.seed}")
        if state.get("fingerprint") not in (None, self._fingerprint):
            changed.append(f"training files ({state.get('num_samples')} -> {len(self.train_dataset)} samples)")
        if changed:
            log.warning("the data changed since the checkpoint (%s): continuing at epoch %d from its first batch.",
                        ", ".join(changed), self.position.epoch)
            self.position.consumed = self.position.steps_in_epoch = 0


class DataPositionCallback(Callback):
    """Tells the datamodule which batches were consumed (after each step, so DataLoader prefetching does not count)
    and when an epoch ends; the datamodule counts replaced samples and stops the run past the failure rate.

    ``max_failure_rate`` overrides the datamodule's. Works with any datamodule that has
    ``on_train_batch_consumed(batch, world_size=...)`` and ``on_train_epoch_finished(epoch)``.
    """

    def __init__(self, max_failure_rate: float | None = None):
        self.max_failure_rate = check_fraction(max_failure_rate, "max_failure_rate", allow_one=True)

    @staticmethod
    def _datamodule(trainer):
        datamodule = getattr(trainer, "datamodule", None)
        if not (hasattr(datamodule, "on_train_batch_consumed") and hasattr(datamodule, "on_train_epoch_finished")):
            raise ValueError(f"DataPositionCallback needs a datamodule that tracks its data position (such as "
                             f"FramePackDataModule), got {type(datamodule).__name__}.")
        return datamodule

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kwargs: dict[str, Any] = {"world_size": trainer.world_size}
        if self.max_failure_rate is not None:
            kwargs["max_failure_rate"] = self.max_failure_rate
        self._datamodule(trainer).on_train_batch_consumed(batch, **kwargs)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._datamodule(trainer).on_train_epoch_finished(trainer.current_epoch)

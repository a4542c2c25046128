"""Frame pack: batch layout, true-fps frames, buckets, the distributed resumable sampler, bad-file replacement."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from cogvx_train.data.frame_pack import (
    Bucket,
    BucketBatchSampler,
    DataPosition,
    FramePackDataModule,
    FramePackDataset,
    check_batch_size,
    check_num_frames,
    check_resolution,
    check_resolutions,
    check_target_fps,
    closest_resolution,
)
from cogvx_train.data.manifest import Manifest, ManifestEntry, read_manifest, write_manifest
from cogvx_train.data.synthetic import decode_frame_index, write_index_clip

BATCH_KEYS = {"video", "num_real_frames", "is_image", "caption", "index", "requested_index", "frame_indices", "fps",
              "path", "failures", "failure_reasons"}
RESOLUTIONS = [[48, 80], [64, 64], [80, 48]]


def entry(path: str, kind: str = "video", num_frames: int = 60, fps: float = 30.0, width: int = 64, height: int = 64,
          caption: str = "c", status: str = "ok") -> ManifestEntry:
    return ManifestEntry(path=path, kind=kind, status=status, caption=caption,
                         num_frames=num_frames if kind == "video" else 1, fps=fps if kind == "video" else None,
                         width=width, height=height,
                         duration=num_frames / fps if kind == "video" else None)


def write_rows(path: Path, entries: list[ManifestEntry]) -> Path:
    """A manifest written directly from rows (no probing): for sampler and failure tests."""
    header = {"schema": "cogvx-manifest", "version": 1, "counts": {}, "files_seen": len(entries)}
    write_manifest(path, Manifest(header, entries, path))
    return path


@pytest.fixture()
def index_manifest(tmp_path) -> Path:
    """Index clips (frame i shows i): a long 30 fps clip, a short 30 fps clip and a long 24 fps clip."""
    write_index_clip(tmp_path / "long30.mp4", 90, 30.0, (64, 64))
    write_index_clip(tmp_path / "short30.mp4", 20, 30.0, (64, 64))
    write_index_clip(tmp_path / "long24.mp4", 80, 24.0, (64, 64))
    return write_rows(tmp_path / "index.jsonl", [
        entry("long30.mp4", num_frames=90, fps=30.0),
        entry("short30.mp4", num_frames=20, fps=30.0),
        entry("long24.mp4", num_frames=80, fps=24.0),
    ])


# ------------------------------------------------------------------------------------------------ validators


@pytest.mark.parametrize("fn, value, match", [
    (check_num_frames, 48, "4k\\+1.*45 and 49"),
    (check_num_frames, 0, "4k\\+1"),
    (check_num_frames, 17.0, "4k\\+1"),
    (check_resolution, [480, 721], "multiples of 16.*\\[480, 720\\]"),
    (check_resolution, [8, 16], "multiples of 16"),
    (check_resolution, "480x720", "\\[H, W\\]"),
    (check_resolutions, [], "non-empty"),
    (check_resolutions, [480, 720], "write \\[\\[480, 720\\]\\]"),
    (check_resolutions, [[64, 64], [64, 64]], "distinct"),
    (check_batch_size, 0, "positive integer"),
    (check_target_fps, [], "positive number"),
    (check_target_fps, -8, "positive number"),
])
def test_validators_say_what_is_wrong(fn, value, match):
    with pytest.raises(ValueError, match=match):
        fn(value)


def test_validators_accept_valid_values():
    assert check_num_frames(49) == 49 and check_num_frames(1) == 1
    assert check_resolution([480, 720]) == (480, 720)
    assert check_target_fps([8, 16]) == (8.0, 16.0) and check_target_fps(None) is None


def test_datamodule_arguments(small_synthetic, tmp_path):
    with pytest.raises(ValueError, match="does not exist.*cogvx-data manifest"):
        FramePackDataModule(tmp_path / "none.jsonl", 9, RESOLUTIONS, 2)
    with pytest.raises(ValueError, match="4k\\+1"):
        FramePackDataModule(small_synthetic, 10, RESOLUTIONS, 2)
    with pytest.raises(ValueError, match="do not combine"):
        FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, num_val_clips=2, val_fraction=0.1)
    empty = write_rows(tmp_path / "empty.jsonl", [entry("a.mp4", status="rejected")])
    with pytest.raises(ValueError, match="no usable rows"):
        FramePackDataModule(empty, 9, RESOLUTIONS, 2).setup()
    with pytest.raises(ValueError, match="would leave none"):
        FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, num_val_clips=12).setup()


# --------------------------------------------------------------------------------------------------- batches


def test_batches_follow_the_layout_one_shape_each(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, target_fps=8.0, use_images=True, image_batch_size=2,
                             num_workers=0, drop_last=False, seed=1)
    dm.setup()
    shapes = set()
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == BATCH_KEYS
        video = batch["video"]
        b, c, t, h, w = video.shape
        shapes.add((t, h, w))
        assert video.dtype == torch.float32 and c == 3 and -1.0 <= video.min() and video.max() <= 1.0
        assert [h, w] in RESOLUTIONS
        image = bool(batch["is_image"][0])
        assert batch["is_image"].tolist() == [image] * b
        assert t == (1 if image else 9) and (t - 1) % 4 == 0
        assert batch["frame_indices"].shape == (b, t) and batch["frame_indices"].dtype == torch.int64
        assert batch["num_real_frames"].dtype == torch.int64 and len(batch["caption"]) == b == len(batch["path"])
        assert torch.equal(batch["index"], batch["requested_index"]) and batch["failures"].sum() == 0
        assert batch["fps"].tolist() == [0.0 if image else 8.0] * b
        seen += batch["index"].tolist()
    manifest = read_manifest(small_synthetic)
    assert sorted(seen) == manifest.indices("ok")  # drop_last=False, one rank: every row exactly once
    assert {s[0] for s in shapes} == {1, 9} and len({s[1:] for s in shapes}) == 3


def test_buckets_come_from_manifest_sizes(small_synthetic):
    manifest = read_manifest(small_synthetic)
    ds = FramePackDataset(manifest, manifest.indices("ok"), 9, RESOLUTIONS, batch_size=3, image_batch_size=5)
    for i, row in enumerate(ds.rows):
        e = manifest.entries[row]
        bucket = ds.buckets[ds.bucket_ids[i]]
        assert bucket.is_image == (e.kind == "image")
        assert [bucket.height, bucket.width] == RESOLUTIONS[closest_resolution(e.width, e.height, RESOLUTIONS)]
        assert bucket.batch_size == (5 if bucket.is_image else 3)
    assert closest_resolution(1920, 1080, [[480, 720], [720, 480], [512, 512]]) == 0
    assert closest_resolution(1080, 1920, [[480, 720], [720, 480], [512, 512]]) == 1


def test_right_source_frames_at_a_true_fps(index_manifest):
    manifest = read_manifest(index_manifest)
    ds = FramePackDataset(manifest, [0, 1, 2], 17, [[64, 64]], target_fps=8.0, start_mode="start")
    long30, short30, long24 = (ds[(0, i)] for i in range(3))
    assert long30["frame_indices"].tolist() == [math.floor(i * 30 / 8) for i in range(17)]
    assert long30["num_real_frames"] == 17
    decoded = [decode_frame_index(long30["video"][:, t]) for t in range(17)]
    assert decoded == long30["frame_indices"].tolist()
    assert long24["frame_indices"].tolist() == [3 * i for i in range(17)]
    # 20 source frames at 30 fps: 6 real frames (0, 3, 7, 11, 15, 18), then the last real one repeated
    assert short30["num_real_frames"] == 6
    assert short30["frame_indices"].tolist() == [0, 3, 7, 11, 15, 18] + [18] * 11
    assert [decode_frame_index(short30["video"][:, t]) for t in range(17)] == short30["frame_indices"].tolist()
    assert torch.equal(short30["video"][:, 5], short30["video"][:, 16])


def test_random_start_and_fps_draws_are_keyed_by_seed_epoch_index(index_manifest):
    manifest = read_manifest(index_manifest)
    ds = FramePackDataset(manifest, [0, 2], 9, [[64, 64]], target_fps=[8.0, 12.0], start_mode="random", seed=4)
    starts, rates = set(), set()
    for epoch in range(12):
        sample = ds[(epoch, 0)]
        fps = sample["fps"]
        rates.add(fps)
        indices = sample["frame_indices"].tolist()
        starts.add(indices[0])
        assert indices == [indices[0] + math.floor(i * 30 / fps + 1e-6) for i in range(9)]
        assert [decode_frame_index(sample["video"][:, t]) for t in range(9)] == indices
        again = ds[(epoch, 0)]
        assert again["frame_indices"].tolist() == indices and torch.equal(again["video"], sample["video"])
    assert rates == {8.0, 12.0} and len(starts) > 3
    center = FramePackDataset(manifest, [0], 9, [[64, 64]], target_fps=8.0, start_mode="center")
    assert {center[(e, 0)]["frame_indices"][0].item() for e in range(3)} == {(89 - 30) // 2}


# --------------------------------------------------------------------------------------------------- sampler


def _buckets_and_ids(sizes=(10, 7, 5), batch_sizes=(2, 3, 2), images=(False, False, True)):
    buckets = [Bucket(64, 64 + 16 * i, 1 if img else 9, img, bs) for i, (bs, img) in enumerate(zip(batch_sizes, images))]
    ids = np.concatenate([np.full(n, b) for b, n in enumerate(sizes)])
    return buckets, np.random.default_rng(0).permutation(ids)


def _epoch(sampler):
    return [[i for _, i in batch] for batch in sampler]


def test_ranks_see_disjoint_batches_in_round_robin_of_the_global_order():
    buckets, ids = _buckets_and_ids()
    one = BucketBatchSampler(ids, buckets, seed=7)
    glob = [b.tolist() for b in one.global_batches(0)]
    assert _epoch(one) == glob
    for bucket_batch in glob:  # each batch from one bucket, at its batch size
        assert len({int(ids[i]) for i in bucket_batch}) == 1
        assert len(bucket_batch) == buckets[int(ids[bucket_batch[0]])].batch_size
    r0 = _epoch(BucketBatchSampler(ids, buckets, seed=7, num_replicas=2, rank=0))
    r1 = _epoch(BucketBatchSampler(ids, buckets, seed=7, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == len(glob) // 2
    assert r0 == glob[0 : 2 * len(r0) : 2] and r1 == glob[1 : 2 * len(r1) : 2]
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    assert len(BucketBatchSampler(ids, buckets, seed=7, num_replicas=3, rank=2)) == len(glob) // 3


def test_epochs_reshuffle_deterministically():
    buckets, ids = _buckets_and_ids()
    a, b = (BucketBatchSampler(ids, buckets, seed=7, drop_last=False) for _ in range(2))
    epoch0 = _epoch(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert _epoch(a) == _epoch(b) != epoch0
    assert sorted(i for x in _epoch(a) for i in x) == sorted(i for x in epoch0 for i in x)
    assert _epoch(BucketBatchSampler(ids, buckets, seed=8, drop_last=False)) != epoch0


def test_image_ratio_sets_the_share_of_image_batches():
    buckets, ids = _buckets_and_ids(sizes=(40, 40, 6), batch_sizes=(2, 2, 2))
    sampler = BucketBatchSampler(ids, buckets, seed=0, image_ratio=0.25)
    batches = sampler.global_batches(0)
    images = [b for b in batches if buckets[int(ids[b[0]])].is_image]
    assert len(batches) - len(images) == 40 and len(images) == round(0.25 / 0.75 * 40)


@pytest.mark.parametrize("new_world", [1, 2, 4])
def test_resume_continues_with_exactly_the_next_global_batches(small_synthetic, new_world):
    kwargs = dict(num_frames=5, resolutions=RESOLUTIONS, batch_size=1, num_workers=0, seed=3)
    full = [b.tolist() for b in
            FramePackDataModule(small_synthetic, **kwargs, rank=0, world_size=1).train_dataloader().batch_sampler
            .global_batches(0)]
    # two ranks consume 2 steps each (4 global batches), then the state is saved
    modules = [FramePackDataModule(small_synthetic, **kwargs, rank=r, world_size=2) for r in range(2)]
    for dm in modules:
        loader = iter(dm.train_dataloader().batch_sampler)
        for _ in range(2):
            next(loader)
            dm.on_train_batch_consumed(world_size=2)
    state = modules[0].state_dict()
    assert state["consumed"] == 4 and state["steps_in_epoch"] == 2 and state == modules[1].state_dict()
    resumed = []
    for r in range(new_world):
        dm = FramePackDataModule(small_synthetic, **kwargs, rank=r, world_size=new_world)
        dm.setup()
        dm.load_state_dict(state)
        resumed.append(_epoch(dm.train_dataloader().batch_sampler))
    rounds = (len(full) - 4) // new_world
    assert all(len(r) == rounds for r in resumed)
    interleaved = [resumed[k % new_world][k // new_world] for k in range(rounds * new_world)]
    assert interleaved == full[4 : 4 + rounds * new_world]
    # Lightning must not stop the resumed epoch early: len() covers what was consumed before
    assert len(dm.train_dataloader()) >= 2 + rounds


def test_epoch_end_advances_the_position(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 5, RESOLUTIONS, 2, num_workers=0)
    loader = dm.train_dataloader()
    for _ in loader:
        dm.on_train_batch_consumed()
    assert dm.state_dict()["epoch"] == 1 and dm.state_dict()["consumed"] == 0
    dm.set_epoch(1)  # Lightning calls this at the next epoch start: no reset of a fresh epoch
    first = next(iter(loader))["index"].tolist()
    dm.on_train_batch_consumed()
    dm.on_train_epoch_finished(1)  # e.g. limit_train_batches ended the epoch early
    assert (dm.position.epoch, dm.position.consumed) == (2, 0)
    assert first != []


# ------------------------------------------------------------------------------------------------ bad files


def _bad_file_manifest(tmp_path, n_good=6, bad=("missing.mp4", "empty.mp4", "text.mp4", "cut.mp4")):
    rows = []
    for i in range(n_good):
        write_index_clip(tmp_path / f"good{i}.mp4", 40, 30.0, (64, 64))
        rows.append(entry(f"good{i}.mp4", num_frames=40))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("text\n" * 50)
    data = (tmp_path / "good0.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    rows += [entry(name, num_frames=40) for name in bad]
    return write_rows(tmp_path / "m.jsonl", rows)


def test_bad_files_are_replaced_deterministically_and_reported(tmp_path, caplog):
    manifest = read_manifest(_bad_file_manifest(tmp_path))
    ds = FramePackDataset(manifest, manifest.indices("ok"), 5, [[64, 64]], target_fps=8.0, seed=2)
    failures = 0
    with caplog.at_level(logging.WARNING, logger="cogvx_train.data.frame_pack"):
        for row, name in zip(range(6, 10), ("missing", "empty", "text", "cut")):
            sample = ds[(0, row)]
            assert sample["requested_index"] == row and sample["index"] != row and sample["index"] < 6
            reasons = sample["failure_reasons"].split("; ")
            assert sample["failures"] == len(reasons) >= 1  # a replacement may itself be one of the bad files
            assert f"{name}.mp4" in reasons[0] and all(r.split(":")[0].split("/")[-1] in
                                                      ("missing.mp4", "empty.mp4", "text.mp4", "cut.mp4") for r in reasons)
            assert sample["path"].endswith(f"good{sample['index']}.mp4")
            again = ds[(0, row)]
            assert again["index"] == sample["index"] and torch.equal(again["video"], sample["video"])
            failures += 2 * sample["failures"]
    assert sum("could not load a sample" in r.message for r in caplog.records) == failures
    assert any("missing.mp4" in r.message and "FileNotFoundError" in r.message for r in caplog.records)
    good = ds[(0, 3)]
    assert good["failures"] == 0 and good["failure_reasons"] == "" and good["index"] == 3


def test_failure_rate_stops_the_run_with_a_clear_message(tmp_path):
    path = _bad_file_manifest(tmp_path, n_good=6, bad=("missing.mp4",))
    dm = FramePackDataModule(path, 5, [[64, 64]], 7, num_workers=0, drop_last=False, max_failure_rate=0.01)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["failure_reasons"]) == 7 and sum(bool(r) for r in batch["failure_reasons"]) == 1
    assert not torch.equal(batch["index"], batch["requested_index"])
    dm.on_train_batch_consumed(batch)  # one bad file never stops a run
    assert dm.position.failures == 1 and dm.position.samples_seen == 7
    with pytest.raises(RuntimeError, match="2 of 14 samples had to be replaced.*max_failure_rate=0.01.*missing.mp4"):
        dm.on_train_batch_consumed(batch)
    tolerant = FramePackDataModule(path, 5, [[64, 64]], 7, num_workers=0, drop_last=False, max_failure_rate=0.2)
    tolerant.setup()
    for _ in range(10):
        tolerant.on_train_batch_consumed(batch)  # 10 / 70 = 14% < 20%
    dm.on_train_batch_consumed(batch, max_failure_rate=0.5)  # the callback's rate overrides the datamodule's


def test_a_bucket_of_only_bad_files_fails_loudly(tmp_path):
    path = write_rows(tmp_path / "m.jsonl", [entry("missing.mp4")])
    ds = FramePackDataset(read_manifest(path), [0], 5, [[64, 64]], max_replacement_attempts=2)
    with pytest.raises(RuntimeError, match="2 replacements from bucket video 5x64x64 all failed"):
        ds[(0, 0)]


# ----------------------------------------------------------------------------------------------- validation


def test_validation_is_fixed_held_out_and_even_across_ranks(small_synthetic):
    def val_indices(rank=0, world=1, epoch=0):
        dm = FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, num_workers=0, num_val_clips=3, rank=rank,
                                 world_size=world)
        dm.setup()
        loader = dm.val_dataloader()
        loader.batch_sampler.set_epoch(epoch)  # Lightning does this; validation must not change
        batches = [(b["index"].tolist(), b["frame_indices"].tolist()) for b in loader]
        return batches, set(dm.train_dataset.rows.tolist())

    single, train_rows = val_indices()
    held = {i for b, _ in single for i in b}
    assert len(held) == 3 and not held & train_rows
    assert val_indices(epoch=5)[0] == single
    r0, _ = val_indices(0, 2)
    r1, _ = val_indices(1, 2)
    assert len(r0) == len(r1) and {i for b, _ in r0 + r1 for i in b} == held


def test_position_state_is_plain_and_complete():
    position = DataPosition(epoch=3, consumed=8, steps_in_epoch=4, samples_seen=40, failures=1)
    position.set_epoch(3)
    assert position.consumed == 8
    position.set_epoch(4)
    assert (position.epoch, position.consumed, position.steps_in_epoch, position.failures) == (4, 0, 0, 1)


def test_val_manifest_with_a_clip_limit(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, num_workers=0, val_manifest=small_synthetic,
                             num_val_clips=2)
    dm.setup()
    assert len(dm.val_dataset) == 2 and len(dm.train_dataset) == 12  # a separate manifest holds nothing out
    everything = FramePackDataModule(small_synthetic, 9, RESOLUTIONS, 2, num_workers=0, val_manifest=small_synthetic)
    everything.setup()
    assert len(everything.val_dataset) == 12


def test_callback_passes_its_rate_and_needs_a_positioned_datamodule(tmp_path):
    from types import SimpleNamespace

    from cogvx_train.data.frame_pack import DataPositionCallback

    calls = []

    class Positioned:
        def on_train_batch_consumed(self, batch, **kwargs):
            calls.append(kwargs)

        def on_train_epoch_finished(self, epoch):
            calls.append(epoch)

    trainer = SimpleNamespace(datamodule=Positioned(), world_size=4, current_epoch=2)
    DataPositionCallback(max_failure_rate=0.5).on_train_batch_end(trainer, None, None, {}, 0)
    DataPositionCallback().on_train_batch_end(trainer, None, None, {}, 1)
    DataPositionCallback().on_train_epoch_end(trainer, None)
    assert calls == [{"world_size": 4, "max_failure_rate": 0.5}, {"world_size": 4}, 2]
    with pytest.raises(ValueError, match="tracks its data position"):
        DataPositionCallback().on_train_batch_end(SimpleNamespace(datamodule=object(), world_size=1), None, None,
                                                  {}, 0)
    with pytest.raises(ValueError, match="max_failure_rate"):
        DataPositionCallback(max_failure_rate=2.0)

"""The training loader keeps its workers decoding across epoch boundaries, and still hands out exactly the
sampler's batches, epoch by epoch, also after the position is moved under it (a resume or a roll-back)."""

from __future__ import annotations

from cogvx_train.data.frame_pack import FramePackDataModule

RESOLUTIONS = [(32, 48), (32, 32), (48, 32)]


def _consume(dm: FramePackDataModule, loader, steps: int | None = None) -> list[list[int]]:
    """Iterate one epoch of `loader` (or `steps` batches of it) as Lightning would, reporting each consumed batch
    (which moves the position to the next epoch after the last one)."""
    seen = []
    for batch in loader:
        seen.append(batch["requested_index"].tolist())
        dm.on_train_batch_consumed(batch)
        if steps is not None and len(seen) == steps:
            break
    return seen


def _expected(dm: FramePackDataModule, epoch: int, start: int = 0) -> list[list[int]]:
    rows = dm.train_dataset.rows
    return [[int(rows[i]) for i in b] for b in dm.train_sampler.global_batches(epoch)[start:]]


def test_workers_prefetch_the_next_epoch_and_batches_are_exactly_the_samplers(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 5, RESOLUTIONS, 2, num_workers=2, seed=1)
    loader = dm.train_dataloader()
    first = _consume(dm, loader)
    stream = loader._iterator
    # the workers were already asked for batches of epoch 1 while epoch 0's last batches trained
    assert stream._send_idx > len(first)
    second = _consume(dm, loader)
    assert loader._iterator is stream, "the workers were restarted at the epoch boundary"
    assert first == _expected(dm, 0) and second == _expected(dm, 1) and first != second
    assert dm.position.epoch == 2 and dm.position.consumed == 0


def test_a_moved_position_restarts_the_stream_where_the_position_is(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 5, RESOLUTIONS, 2, num_workers=2, seed=1)
    loader = dm.train_dataloader()
    _consume(dm, loader, steps=2)  # an epoch left early: the stream ran ahead of the position
    state = dm.state_dict()
    later = _consume(dm, loader)  # iter() again: the rest of epoch 0, from the reported position
    assert later == _expected(dm, 0, start=2)
    dm.load_state_dict(state)  # rolled back to after batch 2 of epoch 0
    assert _consume(dm, loader) == _expected(dm, 0, start=2)
    assert _consume(dm, loader) == _expected(dm, 1)


def test_without_workers_the_epochs_are_the_same(small_synthetic):
    dm = FramePackDataModule(small_synthetic, 5, RESOLUTIONS, 2, num_workers=0, seed=1)
    loader = dm.train_dataloader()
    assert len(loader) == len(_expected(dm, 0))
    assert [_consume(dm, loader) for _ in range(3)] == [_expected(dm, e) for e in range(3)]


def test_worker_batches_carry_small_fields_inline_and_reach_the_loop_as_tensors(small_synthetic):
    """Only the video crosses from a worker in shared memory (each tensor costs a file-descriptor round trip with the
    worker); the small fields travel inside the pickle as numpy and come out of both loaders as tensors."""
    import numpy as np
    import torch

    from cogvx_train.data.frame_pack import _collate

    dm = FramePackDataModule(small_synthetic, 5, RESOLUTIONS, 2, num_workers=2, val_num_workers=1,
                             num_val_clips=2, seed=1)
    train = dm.train_dataloader()
    raw = _collate([dm.train_dataset[key] for key in next(iter(dm.train_sampler))])
    assert isinstance(raw["video"], torch.Tensor) and isinstance(raw["index"], np.ndarray)
    assert [k for k, v in raw.items() if isinstance(v, torch.Tensor)] == ["video"]
    for loader in (train, dm.val_dataloader()):
        batch = next(iter(loader))
        assert {k: v.dtype for k, v in batch.items() if isinstance(v, torch.Tensor)} == {
            "video": torch.float32, "num_real_frames": torch.int64, "is_image": torch.bool, "index": torch.int64,
            "requested_index": torch.int64, "frame_indices": torch.int64, "fps": torch.float32,
            "failures": torch.int64}

"""Two real processes (Lightning DDP on CPU with gloo): ranks see disjoint samples in the global round robin, and a
checkpoint taken by two ranks resumes in one process with exactly the next global batches.

The processes are forked (strategy "ddp_fork"): spawned ones re-import torch and Lightning, which takes ~40 s on
a busy 2-core machine instead of ~2 s.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from cogvx_train.data.frame_pack import DataPositionCallback, FramePackDataModule

RESOLUTIONS = [[48, 80], [64, 64], [80, 48]]
KWARGS = dict(num_frames=5, resolutions=RESOLUTIONS, batch_size=1, target_fps=8.0, num_workers=0, seed=5)


class RankRecorder(L.LightningModule):
    """Appends the manifest rows of every batch to a per-rank file."""

    def __init__(self, log_prefix: str):
        super().__init__()
        self.log_prefix = log_prefix
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        with open(f"{self.log_prefix}{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(batch["requested_index"].tolist()) + "\n")
        return (self.weight - batch["video"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.distributed
def test_two_processes_see_disjoint_samples_and_resume_in_one(small_synthetic, tmp_path):
    reference = FramePackDataModule(small_synthetic, **KWARGS, rank=0, world_size=1)
    sampler = reference.train_dataloader().batch_sampler
    rows = reference.train_dataset.rows
    global_order = [[int(rows[i]) for i in batch] for batch in sampler.global_batches(0)]
    assert len(global_order) == 12

    steps = 3
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, max_steps=steps,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0,
                        callbacks=[DataPositionCallback(), L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=tmp_path / "ckpt", every_n_train_steps=steps, filename="last")])
    trainer.fit(RankRecorder(str(tmp_path / "ddp_rank")), datamodule=FramePackDataModule(small_synthetic, **KWARGS))
    rank0, rank1 = _read(tmp_path / "ddp_rank0.jsonl"), _read(tmp_path / "ddp_rank1.jsonl")
    assert rank0 == global_order[0 : 2 * steps : 2] and rank1 == global_order[1 : 2 * steps : 2]
    assert not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["FramePackDataModule"]["consumed"] == 2 * steps
    single = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                       callbacks=[DataPositionCallback()], enable_checkpointing=False)
    single.fit(RankRecorder(str(tmp_path / "single_rank")), datamodule=FramePackDataModule(small_synthetic, **KWARGS),
               ckpt_path=ckpt)
    assert _read(tmp_path / "single_rank0.jsonl") == global_order[2 * steps :]


def test_lightning_must_not_inject_its_own_sampler(small_synthetic):
    class FakeConnector:
        use_distributed_sampler = True

    class FakeTrainer:
        _accelerator_connector = FakeConnector()
        callbacks = [DataPositionCallback()]
        global_rank, world_size = 0, 2

    dm = FramePackDataModule(small_synthetic, **KWARGS)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()

"""Resume through a real Lightning Trainer: a run stopped at any step and resumed sees exactly the samples an
uninterrupted run sees (the datamodule state rides in the checkpoint; DataPositionCallback counts batches)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from cogvx_train.data.frame_pack import DataPositionCallback, FramePackDataModule

RESOLUTIONS = [[48, 80], [64, 64], [80, 48]]


class Recorder(L.LightningModule):
    """Trains one scalar and appends (epoch, requested indices, used indices) of every batch to a file."""

    def __init__(self, log_file: str):
        super().__init__()
        self.log_file = log_file
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        with open(self.log_file, "a") as f:
            f.write(json.dumps([self.current_epoch, batch["requested_index"].tolist()]) + "\n")
        return (self.weight - batch["video"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(manifest, tmp_path, name, num_workers, max_steps=-1, ckpt_path=None, every=None):
    torch.manual_seed(0)
    log_file = tmp_path / f"{name}.jsonl"
    callbacks = [DataPositionCallback()]
    if every is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, max_steps=max_steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, callbacks=callbacks, enable_checkpointing=every is not None)
    dm = FramePackDataModule(manifest, 5, RESOLUTIONS, 2, target_fps=8.0, num_workers=num_workers, seed=11)
    trainer.fit(Recorder(str(log_file)), datamodule=dm, ckpt_path=ckpt_path)
    return [json.loads(line) for line in log_file.read_text().splitlines()]


@pytest.mark.parametrize("stop_at, num_workers", [(2, 0), (4, 1), (6, 0)])
def test_stop_and_resume_sees_exactly_the_uninterrupted_samples(small_synthetic, tmp_path, stop_at, num_workers):
    reference = _fit(small_synthetic, tmp_path, "reference", num_workers=0)
    per_epoch = sum(1 for epoch, _ in reference if epoch == 0)
    assert per_epoch == 6 and len(reference) == 12  # 4 clips per bucket, batch 2: stop_at=6 is the epoch boundary
    assert reference[:6] != reference[6:]  # epochs are reshuffled
    first = _fit(small_synthetic, tmp_path, "first", num_workers, max_steps=stop_at, every=stop_at)
    assert first == reference[:stop_at]
    ckpt = tmp_path / "ckpt" / f"step={stop_at}.ckpt"
    state = torch.load(ckpt, weights_only=False)["FramePackDataModule"]
    assert state["format"] == "cogvx-frame-pack-position"
    assert (state["epoch"], state["consumed"]) == ((1, 0) if stop_at == per_epoch else (0, stop_at))
    second = _fit(small_synthetic, tmp_path, "second", num_workers, ckpt_path=ckpt)
    assert first + second == reference

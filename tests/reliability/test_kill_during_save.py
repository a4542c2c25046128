"""A kill while a checkpoint is written leaves the previous one loadable; keep-last-k keeps exactly k step files,
the final step is always saved, and a resumed run re-saves its steps under the same names."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cogvx_train.train.checkpointing import (
    AtomicCheckpointIO,
    atomic_torch_save,
    build_checkpoint_callback,
    remove_partial_files,
)


def _wait_for(path: Path, pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the writer never reached {path.name}")
        time.sleep(0.01)


def _stalled_save(obj, f) -> None:
    """torch.save that writes the first half of the file, then stops (until it is killed)."""
    import io

    buf = io.BytesIO()
    _REAL_SAVE(obj, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    (Path(os.environ["STALL_MARKER"])).touch()
    time.sleep(600)


_REAL_SAVE = torch.save


def _fork_writer(write, marker: Path) -> int:
    """Run `write()` in a forked child whose torch.save stalls half-way; return its pid once it has stalled."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.environ["STALL_MARKER"] = str(marker)
            torch.save = _stalled_save
            write()
        finally:
            os._exit(0)
    _wait_for(marker, pid)
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_kill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    old = {"step": 1, "w": torch.arange(1000.0)}
    new = {"step": 2, "w": torch.randn(200_000)}
    atomic_torch_save(old, path)

    pid = _fork_writer(lambda: atomic_torch_save(new, path), tmp_path / "stalled-atomic")
    partial = list(path.parent.glob("last.ckpt.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written temporary file
    _kill(pid)

    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], old["w"])
    assert remove_partial_files(path.parent) == partial  # what `resume=` cleans up
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    # the same kill against a plain torch.save over the file destroys the only copy: what atomicity prevents
    plain = tmp_path / "plain.ckpt"
    torch.save(old, plain)

    def plain_save() -> None:
        with open(plain, "wb") as f:
            torch.save(new, f)

    _kill(_fork_writer(plain_save, tmp_path / "stalled-plain"))
    with pytest.raises(Exception):
        torch.load(plain, weights_only=True)


def test_real_kill_during_a_large_save_gives_the_old_or_the_new_file(tmp_path):
    """No simulation: SIGKILL at a random moment of writing ~40 MB; the file is always one whole checkpoint."""
    path = tmp_path / "last.ckpt"
    old, new = {"step": 1, "w": torch.zeros(10)}, {"step": 2, "w": torch.ones(10_000_000)}
    for delay in (0.0, 0.02, 0.1):
        atomic_torch_save(old, path)
        pid = os.fork()
        if pid == 0:
            try:
                atomic_torch_save(new, path)
            finally:
                os._exit(0)
        time.sleep(delay)
        _kill(pid)
        loaded = torch.load(path, weights_only=True)
        assert loaded["step"] in (1, 2)
        assert torch.equal(loaded["w"], (old if loaded["step"] == 1 else new)["w"])
        remove_partial_files(tmp_path)


def _fit(ckpt_dir: Path, max_steps: int, every: int, keep: int, ckpt_path: str | None = None) -> None:
    import lightning.pytorch as pl

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                         callbacks=[build_checkpoint_callback(ckpt_dir, every, keep)])
    trainer.fit(Linear(), data, ckpt_path=ckpt_path)


def _steps(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir())


def test_keep_last_k_keeps_k_files_saves_the_final_step_and_resaves_in_place(tmp_path):
    import shutil

    ckpts = tmp_path / "checkpoints"
    _fit(ckpts, max_steps=7, every=2, keep=2)
    # saves at 2, 4, 6 and the final step 7 (not a multiple of 2); only the newest 2 step files stay
    assert _steps(ckpts) == ["last.ckpt", "step-00000006.ckpt", "step-00000007.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 7

    # a kill after step-00000008.ckpt was written but before last.ckpt was: last.ckpt still holds step 7
    _fit(ckpts, max_steps=8, every=2, keep=2, ckpt_path=str(ckpts / "last.ckpt"))
    assert _steps(ckpts) == ["last.ckpt", "step-00000007.ckpt", "step-00000008.ckpt"]
    shutil.copy(ckpts / "step-00000007.ckpt", ckpts / "last.ckpt")

    # resuming re-saves step 8 under its own name (no step-00000008-v1.ckpt beside it) and k still holds
    _fit(ckpts, max_steps=11, every=2, keep=2, ckpt_path=str(ckpts / "last.ckpt"))
    assert _steps(ckpts) == ["last.ckpt", "step-00000010.ckpt", "step-00000011.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 11

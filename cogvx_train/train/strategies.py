"""`trainer=ddp | fsdp | deepspeed_zero1/2/3`: the distribution strategy, chosen in one place (`build_strategy`).

DDP is Lightning's own. DeepSpeed ZeRO gets `CogvxDeepSpeedStrategy` (cogvx_train/train/zero.py) and FSDP
`FSDPWithCPUStrategy` (cogvx_train/train/fsdp.py): Lightning's strategies plus CPU runs (gloo), checkpoints that a
kill cannot leave half-written, resume at another world size and an EMA kept in the sharded layout; their module
docstrings say how. What the strategies share lives here: the atomic save of a sharded checkpoint directory
(`save_directory_atomically`) and the global gradient norm the DiT logs (`gradient_norm`).

Gradient clipping under DeepSpeed happens inside the engine (`gradient_clipping` in its config): the
LightningModule's `configure_gradient_clipping` is a no-op there, so `build_strategy(gradient_clip_val=...)` puts
`optim.grad_clip` into the engine config.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig

log = logging.getLogger("cogvx_train")

TIMEOUT = timedelta(minutes=30)


def build_strategy(t: DictConfig, find_unused_parameters: bool = False, gradient_clip_val: float = 0.0):
    """The Lightning strategy for `trainer.strategy` (ddp | fsdp | deepspeed_zero1/2/3 | a Lightning name).

    `gradient_clip_val` (the run's optim.grad_clip) only matters for DeepSpeed, whose engine does the clipping.
    """
    from cogvx_train.train.fsdp import FSDPWithCPUStrategy
    from cogvx_train.train.zero import CogvxDeepSpeedStrategy

    name = str(t.strategy)
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=TIMEOUT)
    if name == "fsdp":
        return FSDPWithCPUStrategy(sharding_strategy="FULL_SHARD", state_dict_type="sharded", use_orig_params=True,
                                   wrap_blocks=bool(t.get("wrap_blocks", True)),
                                   cpu_offload=bool(t.get("cpu_offload", False)), timeout=TIMEOUT)
    if name.startswith("deepspeed_zero"):
        return CogvxDeepSpeedStrategy(stage=int(name[-1]), offload_optimizer=bool(t.get("offload_optimizer", False)),
                                      offload_parameters=bool(t.get("offload_parameters", False)),
                                      gradient_clip_val=float(gradient_clip_val or 0.0), timeout=TIMEOUT)
    return name


def on_cpu(strategy) -> bool:
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(strategy.accelerator, CPUAccelerator)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_in_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing an older one. Directories cannot be renamed over,
    so the old one steps aside to `<target>.old` first; only the instant between the two renames has no `target`,
    and then `<target>.old` is a complete checkpoint (`recover_checkpoint_dir` puts it back)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.exists():
        shutil.rmtree(old)


def save_directory_atomically(strategy, filepath, write) -> None:
    """A sharded checkpoint directory that a kill cannot leave half-written: every rank `write`s its part into
    `<filepath>.tmp`, fsyncs it and meets the others at a barrier; only then rank 0 swaps the finished directory
    in (`swap_in_directory`). A save at another world size than the last one leaves no shard of it behind."""
    target = Path(strategy.broadcast(str(filepath)))
    tmp = target.with_name(target.name + ".tmp")
    if strategy.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)  # left over from a save that was killed
    strategy.barrier("cogvx_save_start")
    write(tmp)
    if tmp.exists():
        _fsync_tree(tmp)
    strategy.barrier("cogvx_save_written")
    if strategy.is_global_zero:
        swap_in_directory(tmp, target)
    strategy.barrier("cogvx_save_done")


def recover_checkpoint_dir(target: Path) -> Path:
    """A checkpoint directory that a crash between the two renames of `swap_in_directory` left as `<target>.old`."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        log.warning("%s is missing but %s is complete (a save was interrupted): using it", target, old)
        os.replace(old, target)
    return target


def gradient_norm(parameters, strategy=None) -> torch.Tensor | None:
    """The global L2 norm of the gradients of `parameters` as the optimizer is about to apply them; None when no
    gradient is held here (DeepSpeed keeps its own partitioned ones, or every gradient was dropped). Under FSDP each
    rank holds the flat pieces of its shard of every gradient (none of some): the squares are summed over the ranks
    (a collective, every rank calls it); otherwise (DDP, one device) the gradients are whole on every rank."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not isinstance(strategy, FSDPStrategy):
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])) if grads else None
    import torch.distributed as dist

    device = strategy.root_device  # the process group's device, wherever the gradients live (CPU offload)
    held = torch.stack([torch.zeros((), device=device), torch.tensor(float(len(grads)), device=device)])
    for g in grads:
        held[0] += g.float().square().sum().to(device)
    dist.all_reduce(held, op=dist.ReduceOp.SUM)
    return held[0].sqrt() if held[1] > 0 else None

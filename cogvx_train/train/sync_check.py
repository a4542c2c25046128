"""`callbacks.weight_sync_check=N`: every N optimizer steps, all ranks prove they hold the same weights.

Data-parallel replicas (DDP, DeepSpeed ZeRO-1/2) must stay bit-identical: they start from rank 0's weights and
apply the same all-reduced update. When they drift (a rank-dependent code path, a non-deterministic kernel inside
a parameter update, a bad host), the loss still looks fine for a while and the checkpoint — written by rank 0 —
silently stops describing what the other ranks train. This check makes drift loud and says where it is.

Checksum: each parameter's raw bit pattern summed as integers (fp32 viewed as int32, bf16/fp16 as int16), so any
change of any bit changes it, computed on the parameter's own device without copies to the host. The per-parameter
sums are all-gathered; every rank compares all rows and raises the same error, so no rank is left waiting.
Sharded strategies (ZeRO-3, FSDP) hold different slices on each rank by design; the check is skipped there.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from lightning.pytorch import Callback
from torch import Tensor

log = logging.getLogger("cogvx_train")

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def parameter_checksums(named_parameters: list[tuple[str, Tensor]]) -> Tensor:
    """[P] int64: the sum of each parameter's bit pattern (integer parameters: their values)."""
    sums = []
    for _, p in named_parameters:
        data = p.detach()
        bits = data.view(_BITS[data.dtype]) if data.dtype in _BITS else data
        sums.append(bits.reshape(-1).to(torch.int64).sum())
    if not sums:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(sums)


def describe_divergence(rows: Tensor, names: list[str], step: int) -> str | None:
    """None when every rank's row equals rank 0's, else one sentence naming the diverged ranks and parameters."""
    bad = [r for r in range(1, rows.shape[0]) if not torch.equal(rows[r], rows[0])]
    if not bad:
        return None
    parts = []
    for r in bad:
        differing = [names[i] for i in torch.nonzero(rows[r] != rows[0]).flatten().tolist()]
        parts.append(f"rank {r} differs in {len(differing)} of {len(names)} parameters (first: {differing[0]})")
    return (f"weights diverged across data-parallel ranks at step {step}: {'; '.join(parts)} from rank 0. Replicas "
            "must apply identical updates; look for rank-dependent code in the training step or a faulty host.")


def digest(row: Tensor) -> str:
    return hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:12]


class WeightSyncCheck(Callback):
    """Compare all ranks' weights every `every_n_steps` optimizer steps and at the end of training (see the module
    docstring); raise RuntimeError naming the diverged rank and its first differing parameter."""

    def __init__(self, every_n_steps: int = 100) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.weight_sync_check={every_n_steps!r} must be a positive number of steps "
                             "(or 0 / null to turn the check off).")
        self.every_n_steps = every_n_steps
        self._last_step: int | None = None
        self._skipped = False
        self.last_digests: list[str] = []

    @staticmethod
    def _sharded(trainer, pl_module) -> bool:
        if type(trainer.strategy).__name__.startswith("FSDP"):
            return True
        return any(hasattr(p, "ds_id") for p in pl_module.parameters())  # ZeRO-3 partitioned parameters

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return  # once per optimizer step (gradient accumulation repeats batch ends)
        if self._sharded(trainer, pl_module):
            if not self._skipped:
                log.info("weight sync check skipped: %s shards parameters across ranks by design",
                         type(trainer.strategy).__name__)
                self._skipped = True
            return
        self._last_step = step
        named = [(n, p) for n, p in pl_module.named_parameters()]
        mine = parameter_checksums(named).to(pl_module.device)
        rows = [torch.empty_like(mine) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(rows, mine)
        table = torch.stack(rows).cpu()
        self.last_digests = [digest(row) for row in table]
        problem = describe_divergence(table, [n for n, _ in named], step)
        if problem:
            raise RuntimeError(problem)
        if trainer.is_global_zero:
            log.info("weight sync check at step %d: %d ranks agree (digests %s)", step, trainer.world_size,
                     " ".join(f"{r}={d}" for r, d in enumerate(self.last_digests)))

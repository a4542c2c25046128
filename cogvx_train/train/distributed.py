"""Rank discovery and the start-up check that every rank runs the same resolved config.

Launchers and the variables they set (Lightning reads them through its cluster environments):
  torchrun             RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ TORCHELASTIC_RUN_ID)
  deepspeed launcher   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  SLURM (srun)         SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODELIST
A hang at start-up is the worst failure on many nodes, so before training every rank publishes a hash of its
resolved config; a rank that does not arrive within the timeout, or arrives with another hash, is named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from datetime import timedelta

import torch
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cogvx_train")

# Keys that legitimately differ between ranks or launches (paths written by the launcher, resume bookkeeping).
RANK_LOCAL_KEYS = ("paths", "resume", "hydra")


def config_hash(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in RANK_LOCAL_KEYS:
        plain.pop(key, None)
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_mismatch(entries: list[dict]) -> str | None:
    """None when all ranks agree, else one sentence naming the ranks that differ from rank 0."""
    reference = entries[0]["hash"]
    bad = [e for e in entries if e["hash"] != reference]
    if not bad:
        return None
    names = ", ".join(f"rank {e['rank']} on {e['host']} (hash {e['hash']})" for e in bad)
    return (f"ranks run different configs: rank 0 has config hash {reference} but {names}; launch every rank "
            "with the same command line, config directory and code version.")


class ConfigAgreementCheck(Callback):
    """At setup, a monitored barrier (names ranks that never arrive) and a hash comparison (names ranks that
    arrive with another config). Runs on gloo so it works next to NCCL."""

    def __init__(self, cfg_hash: str, timeout_s: float = 300.0) -> None:
        self.cfg_hash = cfg_hash
        self.timeout = timedelta(seconds=timeout_s)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        group = torch.distributed.new_group(backend="gloo", timeout=self.timeout)
        try:
            torch.distributed.monitored_barrier(group=group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as err:  # the message lists the ranks that did not arrive
            raise RuntimeError(f"start-up check: not every rank arrived within {self.timeout.seconds}s: {err}. "
                               "Check that every node was launched and can reach MASTER_ADDR.") from err
        mine = {"rank": trainer.global_rank, "host": socket.gethostname(), "hash": self.cfg_hash,
                "pid": os.getpid()}
        entries: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(entries, mine, group=group)
        problem = describe_mismatch(entries)
        if problem:
            raise RuntimeError(problem)
        if trainer.global_rank == 0:
            log.info("start-up check: %d ranks agree on config hash %s", trainer.world_size, self.cfg_hash)

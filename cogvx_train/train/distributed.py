"""Rank discovery and the start-up check that every rank runs the same resolved config.

Launchers and the variables they set (Lightning reads them through its cluster environments):
  torchrun             RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ TORCHELASTIC_RUN_ID)
  deepspeed launcher   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, CROSS_RANK (its node index)
  SLURM (srun)         SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS(_PER_NODE), SLURM_NODELIST, SLURM_JOB_ID
                       (MASTER_ADDR: the first node of the list; MASTER_PORT: 15000 + the job id's last 4 digits)
A hang at start-up is the worst failure on many nodes, so before training every rank publishes a hash of its
resolved config; a rank that does not arrive within the timeout, or arrives with another hash, is named.
"""

from __future__ import annotations

import hashlib
import itertools
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


def adopt_launcher_node_rank(environ=os.environ) -> None:
    """The deepspeed launcher puts a process's node index in CROSS_RANK only, and Lightning (which computes each
    global rank as node rank x devices + LOCAL_RANK and ignores RANK) reads NODE_RANK or GROUP_RANK: without this,
    every node of a multi-node deepspeed-launcher job believes it is node 0 and the ranks collide."""
    if "CROSS_RANK" in environ and "NODE_RANK" not in environ and "GROUP_RANK" not in environ:
        environ["NODE_RANK"] = environ["CROSS_RANK"]


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


def describe_missing(missing: list[int], arrived: list[int], timeout_s: float) -> str:
    """One sentence naming the ranks that never reached the start-up check."""
    names = ", ".join(str(r) for r in missing)
    return (f"start-up check: rank{'s' if len(missing) > 1 else ''} {names} did not arrive within {timeout_s:g}s "
            f"(ranks {', '.join(map(str, arrived)) or 'none'} did); check that every node was launched, runs the "
            "same code and can reach MASTER_ADDR.")


_ROUNDS = itertools.count()  # every rank runs the same checks in the same order: the n-th check meets the n-th


def check_ranks_agree(cfg_hash: str, rank: int, world_size: int, timeout_s: float = 300.0,
                      store: torch.distributed.Store | None = None) -> list[dict]:
    """Every rank publishes {rank, host, hash, pid} in the job's key-value store (the one its process group was
    built on) and waits at most `timeout_s` for all the others. Raises RuntimeError naming the ranks that never
    arrived, or the ranks whose config hash differs from rank 0's; every rank that gets here raises the same.

    A store, not a collective: a barrier on a process group blocks until its own timeout without saying who is
    missing (monitored_barrier names them, but only on gloo and only after a group every rank must create, the
    missing one included). Store keys can be waited for with a timeout and tested one by one.
    """
    store = store if store is not None else torch.distributed.distributed_c10d._get_default_store()
    prefix = f"cogvx/start-up/{next(_ROUNDS)}/"
    keys = [f"{prefix}{r}" for r in range(world_size)]
    mine = {"rank": rank, "host": socket.gethostname(), "hash": cfg_hash, "pid": os.getpid()}
    store.set(keys[rank], json.dumps(mine))
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except torch.distributed.DistStoreError:
        arrived = [r for r, key in enumerate(keys) if store.check([key])]
        missing = [r for r in range(world_size) if r not in arrived]
        if missing:  # (empty when the last rank arrived just after the timeout)
            raise RuntimeError(describe_missing(missing, arrived, timeout_s)) from None
    entries = [json.loads(store.get(key)) for key in keys]
    problem = describe_mismatch(entries)
    if problem:
        raise RuntimeError(problem)
    return entries


class ConfigAgreementCheck(Callback):
    """At setup, before anything heavy: `check_ranks_agree` names ranks that never arrive within `timeout_s` and
    ranks that arrive with another config. Needs only the job's store, so it works under any backend."""

    def __init__(self, cfg_hash: str, timeout_s: float = 300.0) -> None:
        self.cfg_hash = cfg_hash
        self.timeout_s = float(timeout_s)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        check_ranks_agree(self.cfg_hash, trainer.global_rank, trainer.world_size, self.timeout_s)
        if trainer.global_rank == 0:
            log.info("start-up check: %d ranks agree on config hash %s", trainer.world_size, self.cfg_hash)

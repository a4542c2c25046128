"""The start-up check names the rank whose resolved config differs (two torchrun "nodes" on this machine, launched
with different command lines) and, within its timeout, a rank that never arrives (two gloo processes, one of which
never calls the check); describe_mismatch says which ranks differ from rank 0."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import BIN, SMALL, env_for

from cogvx_train.train.distributed import config_hash, describe_mismatch

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_describe_mismatch_names_the_ranks_that_differ_from_rank_0():
    same = [{"rank": r, "host": "n0", "hash": "aaa"} for r in range(4)]
    assert describe_mismatch(same) is None
    mixed = [{"rank": 0, "host": "n0", "hash": "aaa"}, {"rank": 1, "host": "n0", "hash": "aaa"},
             {"rank": 2, "host": "n1", "hash": "bbb"}, {"rank": 3, "host": "n1", "hash": "ccc"}]
    message = describe_mismatch(mixed)
    assert "rank 0 has config hash aaa" in message
    assert "rank 2 on n1 (hash bbb)" in message and "rank 3 on n1 (hash ccc)" in message
    assert "rank 1 " not in message


def test_config_hash_ignores_paths_and_resume_but_not_settings():
    from omegaconf import OmegaConf

    base = {"seed": 1, "optim": {"lr": 1e-4}, "paths": {"output_dir": "/a"}, "resume": None}
    h = config_hash(OmegaConf.create(base))
    assert config_hash(OmegaConf.create(base | {"paths": {"output_dir": "/b"}, "resume": "/r"})) == h
    assert config_hash(OmegaConf.create(base | {"seed": 2})) != h
    assert config_hash(OmegaConf.create(base | {"optim": {"lr": 2e-4}})) != h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_rank_with_another_config_is_named_at_start_up(tmp_path, cli_env, dataset, tiny_vae_dir):
    env = env_for(cli_env, tmp_path / "out")
    port = _free_port()
    common = ["stage=dit_b1", *SMALL, f"model.vae.weights={tiny_vae_dir}", "trainer=ddp", "trainer.accelerator=cpu",
              "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_steps=2"]
    procs = []
    for node, extra in ((0, []), (1, ["seed=7"])):  # node 1 (= rank 1) was launched with another seed
        cmd = [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(BIN), *common, *extra]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("the start-up check hung instead of naming the rank")
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    for node, text in enumerate(outputs):  # both ranks stop with the same sentence, naming rank 1
        lines = [ln for ln in text.splitlines() if "ranks run different configs" in ln]
        assert lines, f"node {node}:\n{text[-3000:]}"
        assert "but rank 1 on " in lines[-1] and "launch every rank with the same command line" in lines[-1]
    assert not list((tmp_path / "out").rglob("*.ckpt"))  # nothing was trained


# One process of a 2-rank gloo job. Rank 0 runs the real start-up check with a 3 s timeout; rank 1 joined the
# process group (so the job exists) but never calls the check, as a rank stuck before training would.
MISSING_RANK_WORKER = """
import json, os, sys, time
from datetime import timedelta
from types import SimpleNamespace
import torch.distributed as dist
from cogvx_train.train.distributed import ConfigAgreementCheck
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=120))
if rank == 1:
    time.sleep(60)  # killed by the test once rank 0 has answered
    os._exit(0)
start = time.monotonic()
try:
    ConfigAgreementCheck("abc", timeout_s=3).setup(SimpleNamespace(world_size=2, global_rank=0), None, "fit")
    error = None
except RuntimeError as err:
    error = str(err)
with open(out, "w") as f:
    json.dump({"error": error, "seconds": time.monotonic() - start}, f)
os._exit(0)
"""


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_that_never_arrives_is_named_within_the_timeout(tmp_path):
    port, out = _free_port(), tmp_path / "rank0.json"
    procs = [subprocess.Popen([sys.executable, "-c", MISSING_RANK_WORKER, str(rank), str(port), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        text = procs[0].communicate(timeout=90)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 0, text[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] is not None, "the check passed with a rank missing"
    # the check's own timeout: neither the process group's (120 s) nor rank 1's exit (60 s)
    assert 3 <= result["seconds"] < 10, result
    assert "rank 1 did not arrive within 3s (ranks 0 did)" in result["error"], result["error"]

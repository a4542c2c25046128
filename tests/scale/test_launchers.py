"""Rank discovery under the other two launchers of the README, on localhost, CPU, gloo: the tiny DiT trains for 4
steps through the `cogvx-train` CLI, every process names the global rank and world size Lightning gave it, and the
weight sync check proves both ranks hold identical weights (as in test_ddp_two_nodes.py, which covers torchrun).

- deepspeed launcher: the REAL `deepspeed` command, twice, as two "nodes" of one hostfile
  (`--no_ssh --node_rank r`, the launcher's own mode for starting each node without ssh), with the
  `--no_local_rank --module cogvx_train.cli.train` of scripts/launch_deepspeed.sh. Each node's launcher spawns
  `python -u -m cogvx_train.cli.train ...` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
  CROSS_RANK, CROSS_SIZE and LOCAL_SIZE; the node index is only in CROSS_RANK.
- SLURM: no SLURM here, so the two processes are started the way `srun` starts the tasks of scripts/slurm.sbatch
  (one node, --ntasks-per-node=2): SLURM_PROCID/LOCALID/NODEID/NTASKS/NTASKS_PER_NODE/NNODES/JOB_NUM_NODES/
  NODELIST/JOB_ID/JOB_NAME and none of the torchrun/deepspeed variables. The sbatch script sets no MASTER_ADDR or
  MASTER_PORT, so neither is set here: Lightning derives them from SLURM_NODELIST and SLURM_JOB_ID.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from scale_helpers import PYTHON, TINY_DIT, assert_trained_in_sync, env_for, free_port, launch, run_dir

from cogvx_train.train.distributed import adopt_launcher_node_rank

DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")
MEMBER = re.compile(r"Initializing distributed: GLOBAL_RANK: (\d+), MEMBER: (\d+)/(\d+)")
DERIVED_WORLD = re.compile(r'derived: \{"world_size": (\d+)')  # what our config checks took from the environment
# set by torchrun, the deepspeed launcher or SLURM: none may leak from the shell running the tests into a case
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID", "COGVX_RUN_ID")


def clean_env(cache_dir: Path, out: Path) -> dict[str, str]:
    env = env_for(cache_dir, out)
    for var in [*LAUNCHER_VARS, *(v for v in env if v.startswith("SLURM_"))]:
        env.pop(var, None)
    return env


def members(output: str) -> set[tuple[int, int]]:
    """{(global rank, world size)} from Lightning's "Initializing distributed" lines in one output."""
    return {(int(rank), int(size)) for rank, _, size in MEMBER.findall(output)}


def assert_ranks(outputs: list[str]) -> None:
    """Process i is global rank i of 2, for Lightning and for our world-size-dependent config checks."""
    assert [members(o) for o in outputs] == [{(0, 2)}, {(1, 2)}], [o[-2000:] for o in outputs]
    assert [set(DERIVED_WORLD.findall(o)) for o in outputs] == [{"2"}, {"2"}]


def slurm_job_id() -> str:
    """A job id whose port (Lightning: 15000 + its last 4 digits) is free on this machine."""
    start = os.getpid() % 10000
    for offset in range(10000):
        n = (start + offset) % 10000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 15000 + n))
            except OSError:
                continue
        return f"7{n:04d}"
    raise RuntimeError("no free port in 15000-24999 for the SLURM job id")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_deepspeed_launcher_two_nodes(tmp_path, cache_dir, tiny_vae_dir):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=ddp", "trainer.devices=1",
            "trainer.num_nodes=2", "trainer.max_steps=4"]
    port = free_port()
    nodes = [[DEEPSPEED, "--no_ssh", "--node_rank", str(r), "--hostfile", str(hostfile), "--master_addr",
              "127.0.0.1", "--master_port", str(port), "--no_local_rank", "--module", "cogvx_train.cli.train", *args]
             for r in (0, 1)]
    env = {**clean_env(cache_dir, tmp_path / "outputs"), "COGVX_RUN_ID": "ds-run"}  # as the script exports it
    outputs = launch(nodes, env, tmp_path)
    assert_ranks(outputs)
    assert run_dir(tmp_path / "outputs").name == "ds-run"
    assert_trained_in_sync(outputs[0])


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_launch_deepspeed_script_on_one_node_needs_no_hostfile_or_ssh(tmp_path, cache_dir, tiny_vae_dir):
    """scripts/launch_deepspeed.sh itself, as the README runs it on one machine: no HOSTFILE, no ssh server."""
    env = {**clean_env(cache_dir, tmp_path / "outputs"), "NPROC": "2", "MASTER_PORT": str(free_port()),
           "PATH": os.pathsep.join([str(Path(PYTHON).parent), os.environ["PATH"]])}
    env.pop("HOSTFILE", None)
    script = Path(__file__).resolve().parents[2] / "scripts" / "launch_deepspeed.sh"
    args = [*TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=ddp", "trainer.max_steps=4"]
    (output,) = launch([["bash", str(script), *args]], env, tmp_path)
    assert members(output) == {(0, 2), (1, 2)}, output[-3000:]
    assert not list(tmp_path.glob("hostfile*"))
    assert_trained_in_sync(output)


def test_launch_deepspeed_script_with_a_missing_hostfile_says_so(tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "launch_deepspeed.sh"
    done = subprocess.run(["bash", str(script), "stage=dit_b1"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HOSTFILE": str(tmp_path / "nodes")}, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f'launch_deepspeed.sh: HOSTFILE={tmp_path / "nodes"} does not exist; give a file '
                                   'with one "host slots=N" line per node, or unset HOSTFILE to train on this node '
                                   'alone.')


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_slurm_tasks(tmp_path, cache_dir, tiny_vae_dir):
    env = clean_env(cache_dir, tmp_path / "outputs")
    env.update({"SLURM_JOB_ID": slurm_job_id(), "SLURM_JOB_NAME": "cogvx-train", "SLURM_NTASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
                "SLURM_NODELIST": "localhost", "SLURM_NODEID": "0"})
    # what scripts/slurm.sbatch runs under srun, its variables expanded
    command = [PYTHON, "-m", "cogvx_train.cli.train", *TINY_DIT, f"model.vae.weights={tiny_vae_dir}", "trainer=ddp",
               f"trainer.devices={env['SLURM_NTASKS_PER_NODE']}", f"trainer.num_nodes={env['SLURM_JOB_NUM_NODES']}",
               "trainer.max_steps=4"]
    # launch() gives every command one environment: each task's own two variables go in through `env`
    tasks = [["env", f"SLURM_PROCID={task}", f"SLURM_LOCALID={task}", *command] for task in (0, 1)]
    outputs = launch(tasks, env, tmp_path)
    assert_ranks(outputs)
    assert all("SLURM auto-requeueing enabled" in o for o in outputs)  # Lightning chose its SLURM environment
    assert run_dir(tmp_path / "outputs").name == env["SLURM_JOB_ID"]  # the run directory every rank shares
    assert_trained_in_sync(outputs[0])


def test_deepspeed_node_index_becomes_lightnings_node_rank():
    environ = {"CROSS_RANK": "3", "CROSS_SIZE": "4", "RANK": "25", "LOCAL_RANK": "1"}
    adopt_launcher_node_rank(environ)
    assert environ["NODE_RANK"] == "3"
    torchrun = {"GROUP_RANK": "2", "CROSS_RANK": "3"}  # a launcher's own node rank wins
    adopt_launcher_node_rank(torchrun)
    assert "NODE_RANK" not in torchrun
    plain = {"RANK": "0"}
    adopt_launcher_node_rank(plain)
    assert plain == {"RANK": "0"}

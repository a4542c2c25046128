"""Launching real multi-process runs from tests: the `cogvx-train` CLI under torchrun (CPU, gloo), a bare
DeepSpeed engine worker for the consolidation tests (run as `python scale_helpers.py zero-worker ...` under
torchrun), a bare ZeRO-3 engine with a sharded EMA (`ema-worker`), and a ZeRO-2/3 training worker that puts NaN into
one rank's batches (`nonfinite-worker`). Everything is tiny: the tiny DiT/VAE/T5, 64x64 frames, 9 frames, a few
steps, one thread per rank."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
HERE = Path(__file__).resolve().parent

# a DiT run that takes seconds: tiny sizes, one 64x64 bucket of 9 frames, 2 clips per rank, no validation
TINY_DIT = ["stage=dit_b1", "experiment=demo", "data.resolutions=[[64,64]]", "data.batch_size=2",
            "data.num_workers=0", "data.num_val_clips=0", "trainer.val_check_interval=1000",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "optim.grad_clip=0.5",
            "callbacks.progress_bar=false", "++callbacks.weight_sync_check=2", "checkpoint.every_n_steps=2",
            "trainer.accelerator=cpu"]

SYNC_LINE = re.compile(r"weight sync check at step (\d+): (\d+) ranks agree \(digests ([0-9a-f= ]+)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(cache_dir: Path, output_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"COGVX_CACHE": str(cache_dir), "COGVX_OUTPUT_DIR": str(output_dir), "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1",
                "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])})
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def launch(commands: list[list[str]], env: dict[str, str], cwd: Path, timeout: float = 240) -> list[str]:
    """Start every command at once (each in its own process group), wait for all; on a failure or a timeout kill
    them all and fail with the tail of each output. Returns each command's combined output."""
    logs = [open(cwd / f"proc{i}.log", "w+") for i in range(len(commands))]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for cmd, log in zip(commands, logs)]
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # let the others report their side of the failure, then stop them
                failed = "a process failed"
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [p.returncode for p in procs]
    if failed or any(codes):
        tails = "\n".join(f"--- command {i} (rc {c}): {' '.join(commands[i][:8])} ...\n{out[-4000:]}"
                          for i, (c, out) in enumerate(zip(codes, outputs)))
        raise AssertionError(f"{failed or 'non-zero exit'}: return codes {codes}\n{tails}")
    return outputs


def torchrun(nproc: int, port: int, args: list[str], nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [TORCHRUN, "--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "cogvx_train.cli.train", *args]


def single(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "cogvx_train.cli.train", *args]


def run_dir(output_dir: Path) -> Path:
    """The one run directory (the one rank 0 wrote its config into)."""
    runs = [p.parent for p in (output_dir / "runs").glob("*/*/config.yaml")]
    assert len(runs) == 1, f"expected one run directory under {output_dir}, found {runs}"
    return runs[0]


def sync_digests(output: str) -> dict[int, list[str]]:
    """{step: [digest of rank 0, digest of rank 1, ...]} from rank 0's weight sync check log lines."""
    out = {}
    for step, _, digests in SYNC_LINE.findall(output):
        out[int(step)] = [d.split("=")[1] for d in digests.split()]
    return out


def assert_trained_in_sync(rank_zero_output: str) -> None:
    """Two ranks, weight sync checks at steps 2 and 4 (TINY_DIT, max_steps=4): both ranks held the same weights at
    each check, and the weights changed between the checks."""
    digests = sync_digests(rank_zero_output)  # rank 0 logs every rank's digest
    assert sorted(digests) == [2, 4], rank_zero_output[-3000:]
    for step, per_rank in digests.items():
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], (step, per_rank)
    assert digests[2][0] != digests[4][0]  # the weights did train between the checks


def run_without_deepspeed(code: str) -> str:
    """Run `code` in a fresh Python process where `import deepspeed` fails, check that nothing imported DeepSpeed
    and that it succeeded; returns its stdout."""
    code = ("import sys; sys.modules['deepspeed'] = None\n" + code +
            "assert not any(m == 'deepspeed' or m.startswith('deepspeed.') for m, v in sys.modules.items() if v)\n")
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def consolidate_without_deepspeed(checkpoint: Path, out: Path, extra: list[str] = ()) -> str:
    """`python -m cogvx_train.cli.convert` in a process where `import deepspeed` fails."""
    return run_without_deepspeed("from cogvx_train.cli.convert import main\n"
                                 f"main({[str(checkpoint), '--out', str(out), *extra]!r})\n")


def init_from_without_deepspeed(sources: list[Path], out: Path) -> list[str]:
    """`init_from=<source>` for each source, in one process where `import deepspeed` fails: a DiT module built with
    the source run's hyper-parameters loads the source's weights. Saves {source: (the module's DiT state_dict, its
    EMA shadow)} to `out`; returns what init_from says it loaded."""
    return run_without_deepspeed(
        "import torch\n"
        "from cogvx_train.dit.init_from import load_init_weights\n"
        "from cogvx_train.dit.module import DiTTrainingModule\n"
        "from cogvx_train.train.consolidate import load_full_training_state\n"
        "loaded = {}\n"
        f"for source in {[str(s) for s in sources]!r}:\n"
        "    module = DiTTrainingModule(**load_full_training_state(source).client_state['hyper_parameters'])\n"
        "    print(load_init_weights(module, source))\n"
        "    loaded[source] = (module.dit.state_dict(), dict(module.ema.shadow))\n"
        f"torch.save(loaded, {str(out)!r})\n").splitlines()


# ------------------------------------------------------------------------------------------------------------
# A bare DeepSpeed ZeRO engine on the CPU (no Lightning), for exact comparisons with the engine's own view of its
# partitioned state. Run under torchrun:  scale_helpers.py zero-worker <train|load> <dir> [world-specific args]
# ------------------------------------------------------------------------------------------------------------
def _tiny_model():
    import torch

    torch.manual_seed(0)
    # 81 matrix and 31 vector values: both flat groups need end padding at 2 and at 3 ranks; two param groups
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.LayerNorm(9), torch.nn.GELU(), torch.nn.Linear(9, 4))


def _engine(stage: int, zero: dict | None = None):
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    deepspeed.init_distributed("gloo")
    model = _tiny_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": stage, **(zero or {})}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           model_parameters=model.parameters(), dist_init_required=False)
    return engine


def _full_view(engine) -> dict:
    """The engine's own gathered view: fp32 master weights and Adam moments per parameter (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed links Adam's state to the parameters once, right after the first param group's first step,
        # before the other groups have state; redo its own linking now that every group has state
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    view = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        view["weights"][name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                view[key][name] = value.clone()
    base = engine.optimizer.optimizer
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    view["step"] = int(steps[0]) if steps else 0
    view["lr"] = [g["lr"] for g in base.param_groups]
    return view


def zero_worker(mode: str, folder: str, stage: int = 2) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(folder)
    engine = _engine(stage)
    rank = dist.get_rank()
    if mode == "train":
        for step in range(3):  # each rank its own data, as data parallelism does
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(4, 5, generator=g), torch.randn(4, 4, generator=g)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(str(out / "ckpt"), tag="checkpoint", client_state={"global_step": 3})
        view = _full_view(engine)
        if rank == 0:
            torch.save(view, out / "engine_view.pt")
    elif mode == "load":
        sys.path.insert(0, str(HERE.parent.parent))
        from cogvx_train.train.consolidate import load_full_training_state
        from cogvx_train.train.zero import load_full_state_into_engine

        full = load_full_training_state(out / "ckpt")
        load_full_state_into_engine(engine, engine.module, full)
        view = _full_view(engine)
        if rank == 0:
            torch.save(view, out / f"loaded_view_{dist.get_world_size()}.pt")
    dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# The EMA sharded under ZeRO-3, on a bare engine of 2 ranks:  scale_helpers.py ema-worker <dir>
# Parameters of up to 10 values stay gathered ("persistent"), the two weight matrices do not: both kinds are used.
# Next to it, a whole EMA over the gathered weights in a plain model is the reference. Rank 0 saves what it saw.
# ------------------------------------------------------------------------------------------------------------
EMA_NAN_STEP = 1  # rank 1's input is NaN at this step: the engine skips it on both ranks


def ema_worker(folder: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE.parent.parent))
    from cogvx_train.train.consolidate import read_deepspeed_checkpoint
    from cogvx_train.train.ema import EMA
    from cogvx_train.train.zero import gathered_parameters, local_values, owned_numel

    torch.set_num_threads(1)
    out = Path(folder)
    engine = _engine(3, {"stage3_param_persistence_threshold": 10})
    rank, model = dist.get_rank(), engine.module
    ema = EMA(model, decay=0.9)
    plain = _tiny_model()
    plain.load_state_dict(gathered_parameters(model))
    reference = EMA(plain, decay=0.9)
    seen: dict = {"persistent": sorted(n for n, p in model.named_parameters() if p.ds_persist),
                  "slice_numel": {n: p.ds_tensor.numel() for n, p in model.named_parameters()}}
    x_eval = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(4, 5, generator=g), torch.randn(4, 4, generator=g)
        if step == EMA_NAN_STEP and rank == 1:
            x.fill_(float("nan"))
        before, slices = engine.skipped_steps, [local_values(p).clone() for p in model.parameters()]
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        ema.skip_next_update(lambda: engine.skipped_steps > before)  # what NonFiniteGuard does under DeepSpeed
        engine.step()
        ema.update(model, step)
        skipped = engine.skipped_steps > before
        if not skipped:  # the reference only sees applied steps
            plain.load_state_dict(gathered_parameters(model))
            reference.update(plain, step)
        unchanged = all(torch.equal(a[:owned_numel(p)], local_values(p)[:owned_numel(p)])
                        for a, p in zip(slices, model.parameters()))
        seen[f"step{step}"] = {"skipped": skipped, "ema_updates": ema.num_updates, "unchanged": unchanged}
    seen["ema"], seen["reference"] = ema.full_shadow(), dict(reference.shadow)

    live = gathered_parameters(model)
    slices = {n: local_values(p).clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        seen["out_live"] = engine(x_eval)
        with ema.swapped_into(model):
            seen["out_swapped"] = engine(x_eval)
        seen["out_after"] = engine(x_eval)
        plain.load_state_dict(seen["reference"])
        seen["out_plain_ema"] = plain(x_eval)
        plain.load_state_dict(live)
        seen["out_plain_live"] = plain(x_eval)
    seen["slices_restored"] = all(torch.equal(slices[n][:owned_numel(p)], local_values(p)[:owned_numel(p)])
                                  for n, p in model.named_parameters())
    seen["persistent_restored"] = all(torch.equal(p.data, live[n]) for n, p in model.named_parameters()
                                      if p.ds_persist)

    # every rank's checkpoint file carries its own slices; consolidation merges them
    engine.save_checkpoint(str(out / "ckpt"), tag="checkpoint", client_state={"dit_ema": ema.state_dict()})
    state = ema.state_dict()
    fresh = EMA(model, decay=0.5)
    fresh.load_state_dict(state)
    seen["reloaded"] = fresh.full_shadow()
    others = [None] * dist.get_world_size()
    dist.all_gather_object(others, state)
    errors = {}
    whole = EMA(_tiny_model(), 0.5)
    for what, target, loaded in (("other_rank", fresh, others[1 - rank]), ("whole_model", whole, state)):
        try:
            target.load_state_dict(loaded)
        except ValueError as err:
            errors[what] = str(err)
    seen["errors"] = errors
    dist.barrier()
    if rank == 0:
        merged = read_deepspeed_checkpoint(out / "ckpt").client_state["dit_ema"]
        seen["merged"] = merged
        torch.save(seen, out / "ema_view.pt")
    dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# ZeRO-2/3 training (the factory's real datamodule, module, callbacks and strategy) with NaN batches on ONE rank:
#   scale_helpers.py nonfinite-worker <out dir> <vae dir> <stage>     under torchrun with 2 processes
# Each rank saves what it held after every step to <out dir>/rank<r>.pt: the whole weights and EMA (ZeRO-3 slices
# gathered, every rank together).
# ------------------------------------------------------------------------------------------------------------
NAN_RANK = 1
NAN_STEPS = (1, 4, 5)  # 1: one skip; 4, 5: two in a row -> roll back to the step-3 checkpoint after step 5
NONFINITE_STEPS = 7


def nonfinite_worker(folder: str, vae_dir: str, stage: int = 2) -> None:
    import torch
    from hydra import compose, initialize_config_module
    from lightning.pytorch import Callback

    from cogvx_train.config import resolvers
    from cogvx_train.train import factory
    from cogvx_train.train.callbacks import NonFiniteGuard
    from cogvx_train.train.run_dir import RunDirectory
    from cogvx_train.train.zero import gathered_parameters

    class NaNOnOneRank(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_rank == NAN_RANK and trainer.global_step in NAN_STEPS:
                batch["video"].fill_(float("nan"))

    class Recorder(Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
            self.rows.append({
                "weights": torch.cat([t.flatten() for t in gathered_parameters(pl_module.dit).values()]).clone(),
                "ema": torch.cat([t.flatten() for t in pl_module.ema.full_shadow().values()]).clone(),
                "ema_updates": pl_module.ema.num_updates, "skipped": guard.total_skipped,
                "rollbacks": guard.rollbacks, "engine": type(trainer.model).__name__,
                "optimizer": type(trainer.model.optimizer).__name__,
                "overflow_check": getattr(trainer.model.optimizer, "check_grad_overflow", None)})

    torch.set_num_threads(1)
    out = Path(folder)
    resolvers.register()
    overrides = [*TINY_DIT, f"model.vae.weights={vae_dir}", f"trainer=deepspeed_zero{stage}", "trainer.devices=2",
                 f"trainer.max_steps={NONFINITE_STEPS}", "checkpoint.every_n_steps=3",
                 "callbacks.nonfinite_guard.max_consecutive=2", f"paths.output_dir={out}"]
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = RunDirectory(out / "run")
    factory.check_config(cfg, 2)
    factory.seed_everything(cfg.seed)
    datamodule, module = factory.build_datamodule(cfg), factory.build_module(cfg, run)
    recorder = Recorder()
    callbacks = [*factory.build_callbacks(cfg, run), NaNOnOneRank(), recorder]
    trainer = factory.build_trainer(cfg, callbacks, factory.build_loggers(cfg, run))
    trainer.fit(module, datamodule=datamodule)
    torch.save(recorder.rows, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "zero-worker":
        zero_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    elif sys.argv[1] == "nonfinite-worker":
        nonfinite_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    elif sys.argv[1] == "ema-worker":
        ema_worker(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}; use zero-worker, ema-worker or nonfinite-worker")

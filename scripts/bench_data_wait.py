"""Share of training-step time spent waiting for data, on the demo runs (stage=dit_b1 / vae_a1, experiment=demo).

    python scripts/bench_data_wait.py                   # 30 steps of each, demo loader (2 workers) vs 0 workers
    python scripts/bench_data_wait.py --steps 60 --kinds dit --repeats 3

Each run is the real training stack built by cogvx_train.train.factory (frame-pack loader on the synthetic demo
set, Lightning loop, every callback), in this process, without checkpoints, validation or loggers. The number is
ThroughputMonitor's: the time between the end of one training batch and the start of the next (the loader's
share, plus the loop's own bookkeeping) over total step time, first batch excluded. The DiT runs on a tiny random
VAE (the demo's trained VAE would change no timing). Reference = the same run with data.num_workers=0 (every batch
decoded in the training process), interleaved with the demo setting; medians over --repeats.
The last line prints the demo's data-wait share per stage (goal <= 2%) and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def run_once(kind: str, workers: int, steps: int, out: Path, vae_dir: Path) -> tuple[float, float, float]:
    """(data-wait share, the same without the first batch of each epoch, median step seconds) of one demo run."""
    from hydra import compose, initialize_config_module

    from cogvx_train.config import resolvers
    from cogvx_train.train import factory
    from cogvx_train.train.callbacks import ThroughputMonitor
    from cogvx_train.train.run_dir import RunDirectory

    resolvers.register()
    overrides = [f"stage={'dit_b1' if kind == 'dit' else 'vae_a1'}", "experiment=demo", f"trainer.max_steps={steps}",
                 f"optim.warmup_steps={min(20, steps)}", f"data.num_workers={workers}", "logger=none",
                 "callbacks.checkpoint=false", "callbacks.progress_bar=false", "callbacks.lr_monitor=false",
                 f"trainer.val_check_interval={steps + 1}", f"paths.output_dir={out}"]
    if kind == "dit":
        overrides.append(f"model.vae.weights={vae_dir}")
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = RunDirectory(out / f"{kind}-{workers}-{time.monotonic_ns()}")
    factory.check_config(cfg, 1)
    factory.seed_everything(cfg.seed)
    datamodule, module = factory.build_datamodule(cfg), factory.build_module(cfg, run)
    callbacks = factory.build_callbacks(cfg, run)
    monitor = next(cb for cb in callbacks if isinstance(cb, ThroughputMonitor))
    per_step: list[tuple[int, float, float]] = []  # (batch index in its epoch, wait, whole step)

    class StepTimes(ThroughputMonitor):  # the same measurement, kept per step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self._wait > 0:
                per_step.append((batch_idx, self._wait, self._wait + start - self._batch_start))

    callbacks[callbacks.index(monitor)] = monitor = StepTimes()
    trainer = factory.build_trainer(cfg, callbacks, [])
    trainer.fit(module, datamodule=datamodule)
    inside = [(w, t) for i, w, t in per_step if i > 0]  # a new epoch's first batch cannot be prefetched
    steady = sum(w for w, _ in inside) / sum(t for _, t in inside)
    return monitor.data_wait_share(), steady, statistics.median(t for _, _, t in per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--kinds", default="dit,vae")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--demo-workers", type=int, default=2, help="data.num_workers of experiment=demo")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from cogvx_train.vae import build_vae, export_diffusers_vae

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        torch.manual_seed(0)
        vae_dir = out / "tiny-vae"
        export_diffusers_vae(build_vae("tiny"), str(vae_dir))
        for rep in range(args.repeats):
            for kind in kinds:
                order = [args.demo_workers, 0] if rep % 2 == 0 else [0, args.demo_workers]  # interleaved A/B
                for workers in order:
                    share, steady, step_s = run_once(kind, workers, args.steps, out, vae_dir)
                    results.setdefault((kind, workers), []).append((share, steady))
                    print(f"{kind} workers={workers} rep={rep}: data wait {100 * share:.2f}% of step time "
                          f"({100 * steady:.2f}% without the first batch of each epoch), median step {step_s:.3f}s",
                          flush=True)
    summary = []
    for kind in kinds:
        demo = statistics.median(s for s, _ in results[(kind, args.demo_workers)])
        steady = statistics.median(s for _, s in results[(kind, args.demo_workers)])
        ref = statistics.median(s for s, _ in results[(kind, 0)])
        ratio = demo / ref if ref > 0 else float("nan")
        summary.append(f"{kind}: data_wait_share={100 * demo:.2f}% (goal <= 2%; {100 * steady:.2f}% within epochs), "
                       f"{ratio:.3f}x of num_workers=0 ({100 * ref:.2f}%)")
    print("; ".join(summary))


if __name__ == "__main__":
    main()

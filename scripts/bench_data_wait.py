"""Share of training-step time spent waiting for data, on the demo runs (stage=dit_b1 / vae_a1, experiment=demo).

    python scripts/bench_data_wait.py                   # 30 steps of each, demo loader (2 workers) vs 0 workers
    python scripts/bench_data_wait.py --steps 60 --kinds dit --repeats 3

Each run is the real training stack built by cogvx_train.train.factory (frame-pack loader on the synthetic demo
set, Lightning loop, every callback), in this process, without checkpoints, validation or loggers; the DiT runs on
a random VAE of the demo's size (trained weights would change no timing). Two numbers, over total step time with
the first batch excluded:
  data wait        time the training loop sits in the train DataLoader's __next__ (measured by wrapping it)
  between steps    ThroughputMonitor's perf/data_wait_share: everything between one batch's end and the next
                   one's start, i.e. the data wait plus the loop's own bookkeeping (metrics, callbacks, scheduler)
Reference = the same run with data.num_workers=0 (every batch decoded in the training process), interleaved with
the demo setting (data.num_workers=2); medians over --repeats. The last line prints the demo's data wait per stage
(goal <= 2%), its ratio to the reference, and perf/data_wait_share.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Result:
    between_steps: float   # ThroughputMonitor's perf/data_wait_share: time between steps / step time
    within_epochs: float   # the same without the first batch of each epoch (epoch starts: the loader's workers
                           # prefetch across epoch boundaries, so these should wait no longer than the others)
    loader_blocked: float  # time the loop sat in the train DataLoader's __next__ / step time
    median_step_s: float


def run_once(kind: str, workers: int, steps: int, out: Path, vae_dir: Path) -> Result:
    from hydra import compose, initialize_config_module
    from torch.utils.data import dataloader

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
    blocked = [0.0]
    counting = [False]  # from the end of the first batch on, like the monitor

    class StepTimes(ThroughputMonitor):  # the same measurement, kept per step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            counting[0] = True
            if self._wait > 0:
                per_step.append((batch_idx, self._wait, self._wait + start - self._batch_start))

    real_next = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self):  # the training loop waiting on the train loader (Lightning prefetches one batch)
        begin = time.perf_counter()
        try:
            return real_next(self)
        finally:
            if counting[0] and self._dataset is datamodule.train_dataset:
                blocked[0] += time.perf_counter() - begin

    callbacks[callbacks.index(monitor)] = monitor = StepTimes()
    trainer = factory.build_trainer(cfg, callbacks, [])
    dataloader._BaseDataLoaderIter.__next__ = timed_next
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        dataloader._BaseDataLoaderIter.__next__ = real_next
    inside = [(w, t) for i, w, t in per_step if i > 0]  # every batch but each epoch's first
    total = monitor.totals["step"]
    return Result(monitor.data_wait_share(), sum(w for w, _ in inside) / sum(t for _, t in inside),
                  blocked[0] / total, statistics.median(t for _, _, t in per_step))


def demo_sized_vae():
    """A VAE of the size the demo DiT expects (model.vae.size / overrides of the demo), seeded random weights."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cogvx_train.config import resolvers
    from cogvx_train.vae import build_vae

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        vae = compose(config_name="train", overrides=["stage=dit_b1", "experiment=demo"]).model.vae
    torch.manual_seed(0)
    return build_vae(vae.size, **OmegaConf.to_container(vae.overrides, resolve=True))


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

    from cogvx_train.vae import export_diffusers_vae

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: dict[tuple[str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        vae_dir = out / "random-vae"
        export_diffusers_vae(demo_sized_vae(), str(vae_dir))
        for rep in range(args.repeats):
            for kind in kinds:
                order = [args.demo_workers, 0] if rep % 2 == 0 else [0, args.demo_workers]  # interleaved A/B
                for workers in order:
                    r = run_once(kind, workers, args.steps, out, vae_dir)
                    results.setdefault((kind, workers), []).append(r)
                    print(f"{kind} workers={workers} rep={rep}: waiting on the loader {100 * r.loader_blocked:.2f}% "
                          f"of step time; between steps {100 * r.between_steps:.2f}% (ThroughputMonitor; "
                          f"{100 * r.within_epochs:.2f}% without epoch starts); median step {r.median_step_s:.3f}s",
                          flush=True)
    summary = []
    for kind in kinds:
        def med(workers: int, field: str) -> float:
            return statistics.median(getattr(r, field) for r in results[(kind, workers)])

        demo, ref = med(args.demo_workers, "loader_blocked"), med(0, "loader_blocked")
        ratio = demo / ref if ref > 0 else float("nan")
        summary.append(f"{kind}: data wait {100 * demo:.2f}% (goal <= 2%; {ratio:.3f}x of num_workers=0's "
                       f"{100 * ref:.2f}%), perf/data_wait_share {100 * med(args.demo_workers, 'between_steps'):.2f}%")
    print("; ".join(summary))


if __name__ == "__main__":
    main()

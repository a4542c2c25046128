"""Training speed of the DiT stage from a latent cache vs from raw videos (frozen VAE + T5 on the fly).

Both runs train the same tiny DiT with the same tiny VAE / T5 on the same synthetic clips (demo shape: 9 frames
at 64x64, batch 4) under a real Lightning Trainer; runs are interleaved (raw, cache, raw, cache, ...) and the
median steps/s of each side is compared, since the machine may be shared. The last line prints the ratio.

    python scripts/bench_latent_cache.py [--steps 30] [--repeats 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
for _name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
logging.getLogger("cogvx_train").setLevel(logging.ERROR)

FRAMES, RESOLUTIONS, FPS, BATCH = 9, [(64, 64)], 8.0, 4
TEXT = {"kind": "tiny", "path": None, "max_length": 32}


class StepTimer:
    """Wall time of the training steps after `skip` warm-up steps (data loading included)."""

    def __init__(self, skip: int):
        from lightning.pytorch import Callback

        timer = self

        class _Callback(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer.stamps.append(time.perf_counter())

        self.skip, self.stamps, self.callback = skip, [], _Callback()

    def steps_per_s(self) -> float:
        stamps = self.stamps[self.skip:]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def train(datamodule, vae: dict, use_cache: bool, steps: int, skip: int) -> float:
    import lightning.pytorch as pl

    from cogvx_train.dit.module import DiTTrainingModule

    torch.manual_seed(0)
    module = DiTTrainingModule(dit_size="tiny", vae=vae, text_encoder=TEXT, diffusion={"snr_shift": 1.0},
                               optim={"warmup_steps": 2}, max_steps=steps, ema={"decay": 0.99},
                               sampling={"prompts": []}, use_latent_cache=use_cache)
    timer = StepTimer(skip)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer.callback])
    trainer.fit(module, datamodule=datamodule)
    return timer.steps_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cogvx_train.data.frame_pack import FramePackDataModule
    from cogvx_train.data.latent_cache import LatentCacheDataModule, precompute
    from cogvx_train.data.synthetic import generate_synthetic_dataset
    from cogvx_train.vae import build_vae, export_diffusers_vae

    root = Path(tempfile.mkdtemp(prefix="bench-latent-cache-"))
    manifest = generate_synthetic_dataset(root / "data", num_videos=16, num_images=0, seed=0, size=(64, 64),
                                          frames=16, fps=8)
    torch.manual_seed(0)
    vae = {"size": "tiny", "weights": str(export_diffusers_vae(build_vae("tiny", scaling_factor=1.0), root / "vae")),
           "scaling_factor": 1.0}
    start = time.perf_counter()
    precompute(manifest, root / "cache", vae=vae, text_encoder=TEXT, num_frames=FRAMES, fps=FPS,
               resolutions=RESOLUTIONS, batch_size=BATCH, progress=False)
    print(f"precompute: {time.perf_counter() - start:.1f} s for 16 clips")

    def raw():
        return FramePackDataModule(manifest, FRAMES, RESOLUTIONS, BATCH, FPS, num_workers=args.workers, seed=0)

    def cached():
        return LatentCacheDataModule(root / "cache", batch_size=BATCH, num_workers=args.workers, seed=0)

    results: dict[str, list[float]] = {"raw": [], "cache": []}
    for r in range(args.repeats):  # interleaved A/B
        results["raw"].append(train(raw(), vae, False, args.steps, skip=3))
        results["cache"].append(train(cached(), vae, True, args.steps, skip=3))
        print(f"repeat {r}: raw {results['raw'][-1]:.2f} steps/s, cache {results['cache'][-1]:.2f} steps/s")
    raw_median, cache_median = statistics.median(results["raw"]), statistics.median(results["cache"])
    print(f"median: raw {raw_median:.2f} steps/s, cache {cache_median:.2f} steps/s "
          f"(tiny DiT/VAE/T5, {FRAMES}x64x64, batch {BATCH}, {args.workers} workers, {args.threads} thread(s))")
    print(f"speed-up cache/raw steps/s: {cache_median / raw_median:.2f}x")


if __name__ == "__main__":
    main()

"""A real 2-process DDP run (CPU, gloo): each rank draws its timesteps inside its own half of [0, 1000), the
per-bucket loss logging gathers both ranks, and the ranks' weights stay identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dit_helpers import latent_batch, loader, module_kwargs, trainer
from lightning.pytorch import Callback

from cogvx_train.dit.module import DiTTrainingModule


class DumpDraws(Callback):
    """Each rank writes the timesteps it drew, its bucket counts and a weight checksum to out/rank{r}.json."""

    def __init__(self, out: str):
        self.out = out
        self.draws: dict[int, list[int]] = {}

    def on_train_start(self, trainer, pl_module):
        original = pl_module.timestep_sampler.sample

        def sample(step, rank, world_size, batch_size):
            t = original(step, rank, world_size, batch_size)
            self.draws[step] = t.tolist()
            return t

        pl_module.timestep_sampler.sample = sample

    def on_train_end(self, trainer, pl_module):
        counts = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/t_count_")}
        checksum = float(sum(p.double().sum() for p in pl_module.dit.parameters()))
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"draws": self.draws, "counts": counts, "checksum": checksum}))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_ddp_draws_disjoint_halves_and_gathers_bucket_stats(tmp_path):
    torch.manual_seed(0)
    module = DiTTrainingModule(**module_kwargs(use_latent_cache=True))
    fit = trainer(2, strategy="ddp_spawn", devices=2, callbacks=[DumpDraws(str(tmp_path))],
                  use_distributed_sampler=False, log_every_n_steps=2)
    fit.fit(module, train_dataloaders=loader(latent_batch(b=2)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step in ("0", "1"):
        low, high = ranks[0]["draws"][step], ranks[1]["draws"][step]
        assert all(0 <= t < 500 for t in low) and all(500 <= t < 1000 for t in high)
        assert sorted(t // 250 for t in low + high) == [0, 1, 2, 3]  # 2 ranks x 2 samples: 4 strata of 250
    # the bucket histogram covers both ranks' samples of the last 2 steps (all-gathered), on every rank
    assert sum(ranks[0]["counts"].values()) == sum(ranks[1]["counts"].values()) == 8
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)

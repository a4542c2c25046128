"""Temporal context parallelism in VAE training (stage A2): two gloo processes under Lightning DDP, each holding half
of every clip's frames, train exactly as one process on whole clips (same logged losses, same G and D weights);
the datamodule gives a context-parallel group the same batches; the config refuses clips that do not split."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from vae_training_helpers import loader, make_module, make_trainer, read_metrics

from cogvx_train.config import ConfigError
from cogvx_train.config.validate import derive, validate

FRAMES, SIZE, NUM_REAL, BATCH, STEPS = 17, 16, 13, 2, 2
# GAN and D from step 0; LPIPS on 5 random real frames per clip (global indices, drawn once per group)
LOSS = {"lpips_net": "vgg", "lpips_frames": 5, "disc_start": 0}
REL = 1e-5
# Adam's first steps are about lr * sign(g) wherever |g| >> eps, which turns rounding differences in near-zero
# gradient entries (1e-9 next to 1e-3) into weight differences of a sizeable fraction of lr whatever the code does;
# with eps above those entries the update stays linear in them, and the weights compare as tightly as the gradients
OPTIM = {"warmup_steps": 1, "eps": 1e-3}


class Record(pl.Callback):
    """Every rank: a rank-dependent seed before each step (so the group's ranks draw different noise unless the
    module shares rank 0's draws, as one process would), its frame share, and its final G and D weights."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.shares: list[tuple[int, ...]] = []
        self.grads: list[tuple[str, dict[str, torch.Tensor]]] = []

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 * trainer.global_step + trainer.global_rank)
        share = pl_module.clip_share(batch["video"].shape[2])
        self.shares.append((share.start, share.frames, share.clip_frames))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after DDP's all-reduce and the clipping: the gradient the update uses
        which = "g" if optimizer is trainer.optimizers[0] else "d"
        model = pl_module.vae if which == "g" else pl_module.discriminator
        self.grads.append((which, {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}))

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.startswith("loss.")}
        torch.save({"state": state, "shares": self.shares, "grads": self.grads},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _fit(root: Path, cp: int) -> list[dict[str, float]]:
    root.mkdir()
    module = make_module(disc_start=0, max_steps=STEPS, ema_decay=0.9, loss=LOSS, optim=OPTIM,
                         context_parallel_size=cp)
    kwargs = {}
    if cp > 1:
        kwargs = dict(devices=cp, use_distributed_sampler=False,  # every rank of the group gets the same clips
                      strategy=DDPStrategy(find_unused_parameters=True, process_group_backend="gloo",
                                           start_method="spawn"))
    threads = torch.get_num_threads()
    try:
        trainer = make_trainer(root, STEPS, callbacks=[Record(str(root))], limit_val_batches=1.0,
                               val_check_interval=STEPS, **kwargs)
        clips = dict(frames=FRAMES, size=SIZE, num_real_frames=NUM_REAL, batch_size=BATCH)
        trainer.fit(module, loader(num_clips=BATCH * STEPS, **clips), loader(num_clips=BATCH + 1, **clips))
    finally:
        torch.set_num_threads(threads)
    return read_metrics(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_training")
    return {cp: (_fit(root / f"cp{cp}", cp), root / f"cp{cp}") for cp in (1, 2)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_split_every_clip(runs):
    one = torch.load(runs[1][1] / "rank0.pt")
    ranks = [torch.load(runs[2][1] / f"rank{r}.pt") for r in range(2)]
    assert one["shares"] == [(0, FRAMES, FRAMES)] * STEPS
    # frame 0 + 2 windows of 4 groups of 4 on rank 0, the other 8 frames on rank 1 (encoder_norm_window 8)
    assert ranks[0]["shares"] == [(0, 9, FRAMES)] * STEPS and ranks[1]["shares"] == [(9, 8, FRAMES)] * STEPS


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_context_parallel_losses_equal_one_process(runs):
    single, split = ([r for r in runs[cp][0] if "train/total" in r] for cp in (1, 2))
    assert [int(r["step"]) for r in split] == list(range(STEPS)) == [int(r["step"]) for r in single]
    keys = [k for k in single[0] if k.startswith("train/")]
    for needed in ("train/l1", "train/lpips", "train/kl", "train/g_loss", "train/adaptive_weight", "train/d_loss",
                   "train/grad_norm_g", "train/grad_norm_d", "train/total"):
        assert needed in keys
    worst = max(_rel(s[k], o[k]) for s, o in zip(split, single) for k in keys)
    assert worst < REL, {k: [(s[k], o[k]) for s, o in zip(split, single)] for k in keys
                         if any(_rel(s[k], o[k]) >= REL for s, o in zip(split, single))}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_context_parallel_gradients_equal_one_process(runs):
    one = torch.load(runs[1][1] / "rank0.pt")["grads"]
    two = torch.load(runs[2][1] / "rank0.pt")["grads"]
    assert [w for w, _ in one] == [w for w, _ in two] == ["g", "d"] * STEPS  # G and D update at every step
    for step, ((which, ref), (_, got)) in enumerate(zip(one, two)):
        assert ref.keys() == got.keys()
        total = math.sqrt(sum(g.double().pow(2).sum().item() for g in ref.values()))
        diff = math.sqrt(sum((got[n] - g).double().pow(2).sum().item() for n, g in ref.items()))
        assert diff <= REL * total, f"update {step} ({which}): gradient differs by {diff / total:.2e} of its norm"
        for name, g in ref.items():
            err = (got[name] - g).abs().max().item()
            assert err <= 3 * REL * g.abs().max().item() + 1e-12, f"update {step} ({which}) {name}: {err:.3g}"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_context_parallel_weights_equal_one_process(runs):
    one = torch.load(runs[1][1] / "rank0.pt")["state"]
    ranks = [torch.load(runs[2][1] / f"rank{r}.pt")["state"] for r in range(2)]
    initial = make_module(disc_start=0, max_steps=STEPS, ema_decay=0.9, loss=LOSS).state_dict()
    changed = 0
    for name, ref in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the two ranks"
        if not ref.is_floating_point():
            continue
        update = (ref - initial[name]).abs().max().item()
        err = (ranks[0][name] - ref).abs().max().item()
        changed += update > 0
        # relative to what the two steps changed (far tighter than relative to the weights), plus float32 rounding
        ulps = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert err <= 10 * REL * update + ulps, f"{name}: max error {err:.3g} for an update of {update:.3g}"
    assert changed > 0.9 * len([v for v in one.values() if v.is_floating_point()])
    assert any(not torch.equal(one[k], initial[k]) for k in one if k.startswith("discriminator."))  # D trained


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_context_parallel_validation_equals_one_process(runs):
    """Every rank reconstructs its slice, the group gathers whole clips and scores them (2 batches, one of 1 clip)."""
    single, split = ([r for r in runs[cp][0] if "val/psnr" in r] for cp in (1, 2))
    assert len(single) == len(split) == 1
    keys = [k for k in single[0] if k.startswith("val/")]
    assert {"val/psnr", "val/ssim", "val/lpips", "val/flicker", "val/temporal_error"} <= set(keys)
    assert {"val/latent_mean", "val/latent_std"} <= set(keys)  # the moments are summed over the group's slices
    for key in keys:
        # the latents' mean is a sum of cancelling terms (0.015 at std 0.31): compared on the scale of their std
        scale = single[0]["val/latent_std"] if key == "val/latent_mean" else abs(single[0][key])
        assert abs(split[0][key] - single[0][key]) < REL * scale, (key, split[0][key], single[0][key])


def test_one_process_refuses_context_parallel_size_two():
    module = make_module(disc_start=0, loss=LOSS, context_parallel_size=2)
    with pytest.raises(ValueError, match="context_parallel_size=2 splits every clip over 2 processes, but this is "
                                         "a single-process run"):
        module.reconstruct(torch.zeros(1, 3, FRAMES, SIZE, SIZE))


# ---- data: a context-parallel group shares its batches ------------------------------------------------------------

def test_datamodule_gives_a_group_the_same_batches(tmp_path):
    from cogvx_train.data.frame_pack import FramePackDataModule
    from cogvx_train.data.synthetic import generate_synthetic_dataset

    manifest = generate_synthetic_dataset(tmp_path / "set", num_videos=8, num_images=0, seed=5)

    def batches(rank: int, world: int, cp: int, consumed: int = 0) -> list[list]:
        dm = FramePackDataModule(manifest, 9, [[32, 32], [32, 48]], 1, num_workers=0, rank=rank, world_size=world,
                                 context_parallel_size=cp)
        dm.position.consumed = consumed
        return [[key[1] for key in batch] for batch in dm.train_dataloader().batch_sampler]

    by_rank = [batches(r, 4, 2) for r in range(4)]
    assert by_rank[0] == by_rank[1] and by_rank[2] == by_rank[3] and by_rank[0] != by_rank[2]
    # the groups are the data-parallel ranks of a 2-rank run without context parallelism
    assert by_rank[0] == batches(0, 2, 1) and by_rank[2] == batches(1, 2, 1)
    # the position is a global batch index: 4 processes in groups of 2 consume 2 batches per step
    dm = FramePackDataModule(manifest, 9, [[32, 32]], 1, num_workers=0, rank=3, world_size=4,
                             context_parallel_size=2)
    dm.train_dataloader()
    dm.on_train_batch_consumed(world_size=4)
    assert dm.position.consumed == 2
    assert batches(2, 4, 2, consumed=2) == batches(1, 2, 1, consumed=2)
    with pytest.raises(ValueError, match="context_parallel_size=2 does not divide the world size 3"):
        FramePackDataModule(manifest, 9, [[32, 32]], 1, num_workers=0, rank=0, world_size=3,
                            context_parallel_size=2).train_dataloader()


# ---- config: mismatches are one sentence before anything is built ------------------------------------------------

def _a2(*overrides: str):
    from hydra import compose, initialize_config_module

    from cogvx_train.config import resolvers

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        return compose(config_name="train", overrides=["stage=vae_a2", "experiment=demo", "init_from=null",
                                                       "requires_init_from=false", *overrides])


def _errors(cfg, world_size: int) -> list[str]:
    try:
        validate(cfg, world_size)
    except ConfigError as err:
        return list(err.messages)
    return []


def test_config_checks_the_clip_split():
    assert _errors(_a2("data.num_frames=17"), 2) == []
    assert _errors(_a2("data.num_frames=161", "context_parallel_size=4"), 8) == []
    d = derive(_a2("data.num_frames=17"), world_size=4)
    assert (d["context_parallel_size"], d["data_parallel_size"], d["global_batch_size"]) == (2, 2, 2 * 4)

    too_short = _errors(_a2("data.num_frames=9"), 2)  # frame 0 + 8 frames: one GroupNorm window for two ranks
    assert too_short == ["data.num_frames=9 with context_parallel_size=2: 9 frames cannot be split over 2 ranks so "
                         "that each rank gets at least 8 frames (ranks between the first and the last: 8); use "
                         "fewer ranks or a longer clip."]
    assert _errors(_a2("data.num_frames=17"), 3) == [
        "context_parallel_size=2 does not divide the world size 3; launch a multiple of 2 ranks."]
    windows = _errors(_a2("data.num_frames=17", "+model.vae.overrides.decoder_norm_window=4"), 2)
    assert len(windows) == 1 and "do not end on the decoder's GroupNorm window of 4" in windows[0]
    stills = _errors(_a2("data.num_frames=17", "data.use_images=true"), 2)
    assert len(stills) == 1 and stills[0].startswith("context_parallel_size=2 splits video clips along time")


# ---- the command line: `cogvx-train stage=vae_a2 ... trainer.devices=2` on the CPU ----------------------------------

def _cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int):
    import subprocess
    import sys

    binary = Path(sys.executable).parent / "cogvx-train"
    return subprocess.run([str(binary), *args], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_refuses_a_clip_too_short_for_the_ranks(tmp_path, cli_env):
    out = _cli(["stage=vae_a2", "experiment=demo", f"init_from={tmp_path}", "trainer.devices=2"], tmp_path, cli_env,
               timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("cogvx-train: error: data.num_frames=9 with context_parallel_size=2: 9 frames cannot be split over 2 ranks"
            in out.stderr), out.stderr[-2000:]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_trains_stage_a2_on_two_cpu_processes(tmp_path, cli_env):
    from cogvx_train.vae import build_vae, export_diffusers_vae

    torch.manual_seed(0)
    a1 = export_diffusers_vae(build_vae("tiny", block_out_channels=(16, 16, 32, 32)), tmp_path / "a1_vae")  # demo's
    out = _cli(["stage=vae_a2", "experiment=demo", f"init_from={a1}", "trainer.devices=2", "data.num_frames=17",
                "trainer.max_steps=2", "optim.warmup_steps=1", "trainer.log_every_n_steps=1", "data.num_workers=0",
                "trainer.val_check_interval=2", "callbacks.progress_bar=false", "vae_loss.disc_start=0"], tmp_path,
               cli_env, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    done = list(Path(cli_env["COGVX_OUTPUT_DIR"]).glob("runs/vae_a2/*/DONE.json"))
    assert len(done) == 1, done
    run = done[0].parent
    log = (run / "train.log").read_text()
    assert '"context_parallel_size": 2, "data_parallel_size": 1' in log
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out.stderr + out.stdout + log
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows if "train/total" in r] == [0, 1]
    assert all(math.isfinite(r["train/d_loss"]) and r["train/adaptive_weight"] > 0 for r in rows if "train/total" in r)
    assert any("val/psnr" in r for r in rows)
    assert (run / "export" / "config.json").is_file()

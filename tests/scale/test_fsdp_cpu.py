"""FSDP for real on the CPU: `trainer=fsdp` with two torchrun ranks (gloo, torch's FullyShardedDataParallel with
FULL_SHARD, fp32, one unit per transformer block) trains the tiny DiT through the `cogvx-train` CLI. Sharding must
not change the training: after the same steps the weights and the EMA equal those of a DDP run of the same seed
(norm clipping active, so a per-shard clip would show), so does the logged gradient norm (a per-shard norm would
be smaller), the weight-decay groups are the DDP ones, the checkpoint is torch's sharded distributed checkpoint,
the EMA keeps its exact recurrence across a resume, `init_from=` reads the sharded checkpoint's EMA directly, and
`cogvx-convert` (no DeepSpeed) and the run's export both give whole tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from scale_helpers import (TINY_DIT, consolidate_without_deepspeed, env_for, free_port, init_from_without_deepspeed,
                           launch, run_dir, sync_digests, torchrun)

from cogvx_train.train.consolidate import read_fsdp_checkpoint, read_lightning_checkpoint

# the gradients of the tiny DiT have norms around 0.2: this clip scales every step (and by a different factor
# per rank's shard if the norm were taken per shard, which moves the weights by ~1e-4 after two Adam steps)
CLIP = "optim.grad_clip=0.0001"


def test_fsdp_wraps_each_transformer_block_unless_switched_off(cache_dir):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cogvx_train.config import ConfigError, resolvers
    from cogvx_train.config.validate import validate
    from cogvx_train.dit import build_dit
    from cogvx_train.dit.transformer import ExpertBlock
    from cogvx_train.train.fsdp import block_classes
    from cogvx_train.train.strategies import build_strategy

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        configs = {extra: compose(config_name="train", overrides=["stage=dit_b1", "experiment=demo", "trainer=fsdp",
                                                                   *([extra] if extra else [])])
                   for extra in ("", "trainer.wrap_blocks=false", "trainer.wrap_blocks=maybe")}
    assert build_strategy(configs[""].trainer).wrap_blocks  # on by default
    assert not build_strategy(configs["trainer.wrap_blocks=false"].trainer).wrap_blocks
    with pytest.raises(ConfigError, match="trainer.wrap_blocks='maybe' must be true"):
        validate(configs["trainer.wrap_blocks=maybe"], 2)
    assert block_classes(build_dit("tiny")) == {ExpertBlock}
    assert OmegaConf.select(configs[""], "trainer.wrap_blocks") is True


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_two_ranks_train_like_ddp_resume_and_convert(tmp_path, cache_dir, tiny_vae_dir):
    replaced = ("optim.grad_clip=", "checkpoint.every_n_steps=", "data.num_val_clips=", "trainer.val_check_interval=")
    validate = ["data.num_val_clips=2", "trainer.val_check_interval=2", "sampling.num_steps=2",
                "sampling.prompts=[a red circle moves from left to right]"]
    args = [*(a for a in TINY_DIT if not a.startswith(replaced)), CLIP, *validate, f"model.vae.weights={tiny_vae_dir}",
            "trainer.devices=2", "checkpoint.every_n_steps=1"]
    fsdp_out, ddp_out = tmp_path / "fsdp", tmp_path / "ddp"
    fsdp_log = launch([torchrun(2, free_port(), [*args, "trainer=fsdp", "trainer.max_steps=2"])],
                      env_for(cache_dir, fsdp_out), tmp_path)[0]
    assert "weight sync check skipped: FSDPWithCPUStrategy shards parameters" in fsdp_log, fsdp_log[-3000:]
    assert "FSDP units: the root and 2 inner (ExpertBlock x2)" in fsdp_log  # the tiny DiT's 2 blocks, one unit each
    ddp_log = launch([torchrun(2, free_port(), [*args, "trainer=ddp", "trainer.max_steps=2"])],
                     env_for(cache_dir, ddp_out), tmp_path)[0]
    assert all(d[0] == d[1] for d in sync_digests(ddp_log).values())

    # torch's sharded checkpoint: each rank wrote its half of every matrix (dim 0 split in two chunks)
    run = run_dir(fsdp_out)
    step2 = run / "checkpoints" / "step-00000002.ckpt"
    assert sorted(p.name for p in step2.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(step2).read_metadata().state_dict_metadata["model.dit.proj_out.weight"]
    assert sorted(tuple(c.offsets) for c in saved.chunks) == [(0, 0), (saved.size[0] // 2, 0)]

    # the same training as DDP: weights, EMA, Adam step and the weight-decay groups (matrices decay, vectors not)
    fsdp = read_fsdp_checkpoint(step2)
    ddp = read_lightning_checkpoint(run_dir(ddp_out) / "checkpoints" / "step-00000002.ckpt")
    assert fsdp.world_size == 2 and fsdp.step == 2 and fsdp.client_state["global_step"] == 2
    assert fsdp.weights.keys() == ddp.weights.keys()
    assert len({n.split(".")[2] for n in fsdp.weights if n.startswith("dit.transformer_blocks.")}) == 2
    for name, value in ddp.weights.items():
        assert value.shape == fsdp.weights[name].shape
        torch.testing.assert_close(fsdp.weights[name], value, rtol=0, atol=1e-6, msg=name)
    ddp_ema, fsdp_ema = ddp.ema_weights(), fsdp.ema_weights()
    assert fsdp_ema.keys() == ddp_ema.keys() and len(fsdp_ema) == len(ddp.weights)
    for name, value in ddp_ema.items():
        torch.testing.assert_close(fsdp_ema[name], value, rtol=0, atol=1e-6, msg=name)
    decay, no_decay = fsdp.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert set(decay["params"]) == {n for n, v in ddp.weights.items() if v.ndim >= 2}
    assert set(no_decay["params"]) == {n for n, v in ddp.weights.items() if v.ndim < 2}
    assert set(fsdp.moments) == {"exp_avg", "exp_avg_sq"} and fsdp.moments["exp_avg"].keys() == ddp.weights.keys()

    # validation at steps 0 and 2: the same losses, and the same samples drawn with the EMA swapped in
    for step in (0, 2):
        fsdp_video = _frames(run / "samples" / f"step{step:07d}_0.mp4")
        ddp_video = _frames(run_dir(ddp_out) / "samples" / f"step{step:07d}_0.mp4")
        assert fsdp_video.shape == ddp_video.shape and (fsdp_video - ddp_video).abs().max() <= 1, step
    assert _logged(run, "val/loss") == pytest.approx(_logged(run_dir(ddp_out), "val/loss"), rel=1e-5)
    assert len(_logged(run, "val/loss")) == 2
    # the gradient norm over all ranks' shards (logged before clipping), the DDP one at every step
    assert _logged(run, "train/grad_norm") == pytest.approx(_logged(run_dir(ddp_out), "train/grad_norm"), rel=1e-5)
    assert sorted(_logged(run, "train/grad_norm")) == [0, 1]

    # init_from=<the run> or <its sharded checkpoint>, in one process without DeepSpeed: the module's weights and
    # its fresh EMA are the checkpoint's EMA (which differs from its live weights after two steps)
    described = init_from_without_deepspeed([run, step2], tmp_path / "init_from.pt")
    assert described == [f"EMA of {run / 'checkpoints' / 'last.ckpt'}", f"EMA of {step2}"]
    assert any(not torch.equal(fsdp_ema[n], fsdp.weights[n]) for n in fsdp_ema)
    for source, (weights, ema_shadow) in torch.load(tmp_path / "init_from.pt").items():
        assert set(weights) == set(ema_shadow) == {n.removeprefix("dit.") for n in fsdp_ema}, source
        for name, value in fsdp_ema.items():
            assert torch.equal(weights[name.removeprefix("dit.")], value), (source, name)
            assert torch.equal(ema_shadow[name.removeprefix("dit.")], value), (source, name)

    # the export after fit holds the whole EMA transformer (every rank's pieces gathered)
    from cogvx_train.dit import load_diffusers_transformer

    exported = load_diffusers_transformer(run / "export" / "transformer", dtype=torch.float32).state_dict()
    assert set(exported) == {n.removeprefix("dit.") for n in fsdp_ema}
    assert all(torch.equal(exported[n.removeprefix("dit.")], t) for n, t in fsdp_ema.items())

    # resume at the same world size: one more step, EMA_3 = lerp(EMA_2, W_3, 1 - d_3) with d_3 = min(decay, 3 / 12)
    launch([torchrun(2, free_port(), [*args, "trainer=fsdp", "trainer.max_steps=3", f"resume={run}"])],
           env_for(cache_dir, fsdp_out), tmp_path)
    assert json.loads((run / "DONE.json").read_text())["global_step"] == 3
    step3 = read_fsdp_checkpoint(run / "checkpoints" / "last.ckpt")
    assert step3.step == 3 and step3.client_state["dit_ema"]["num_updates"] == 3
    d = min(step3.client_state["dit_ema"]["decay"], 3 / 12)
    ema3 = step3.ema_weights()
    for name, before in fsdp_ema.items():
        assert torch.equal(ema3[name], before.lerp(step3.weights[name], 1.0 - d)), name
    assert sum(not torch.equal(fsdp.weights[n], step3.weights[n]) for n in fsdp.weights) >= 10

    # one safetensors file from the sharded checkpoint, where `import deepspeed` fails: weights plus the EMA
    consolidate_without_deepspeed(run, tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == set(step3.weights) | {f"ema.{n}" for n in ema3}
    assert all(torch.equal(tensors[n], t) for n, t in step3.weights.items())
    assert all(torch.equal(tensors[f"ema.{n}"], t) for n, t in ema3.items())


def _frames(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]).int()


def _logged(run, key: str) -> dict[int, float]:
    """{step: value} of one metric in the run's metrics.csv."""
    import csv

    with open(run / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_bf16_mixed_trains_and_validates_like_ddp_bf16_mixed(tmp_path, cache_dir, tiny_vae_dir):
    """bf16-mixed on 2 CPU ranks: FSDP computes in bf16 (its MixedPrecision casts the gathered weights) under
    autocast on the run's device (Lightning's FSDP plugin autocasts CUDA only, which left the block units' bf16
    weights meeting fp32 activations on a CPU); the losses, grad norms and validation agree with DDP's bf16 autocast
    within bf16 error."""
    replaced = ("checkpoint.every_n_steps=", "data.num_val_clips=", "trainer.val_check_interval=")
    args = [*(a for a in TINY_DIT if not a.startswith(replaced)), "data.num_val_clips=2",
            "trainer.val_check_interval=2", "sampling.num_steps=2", "sampling.prompts=[a red circle moves up]",
            f"model.vae.weights={tiny_vae_dir}", "trainer.devices=2", "checkpoint.every_n_steps=2",
            "trainer.max_steps=2", "trainer.precision=bf16-mixed"]
    runs = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        launch([torchrun(2, free_port(), [*args, f"trainer={strategy}"])], env_for(cache_dir, out), tmp_path)
        runs[strategy] = run_dir(out)
        assert json.loads((runs[strategy] / "DONE.json").read_text())["global_step"] == 2
    for key, steps, rel in [("train/loss", [0, 1], 2e-2), ("train/grad_norm", [0, 1], 5e-2), ("val/loss", [0, 1], 2e-2)]:
        fsdp, ddp = _logged(runs["fsdp"], key), _logged(runs["ddp"], key)
        assert sorted(fsdp) == sorted(ddp) == steps, key  # validation after step 2 is logged at step 1
        assert all(math.isfinite(v) for v in fsdp.values()), key
        assert fsdp == pytest.approx(ddp, rel=rel), key
    assert (runs["fsdp"] / "samples" / "step0000002_0.mp4").is_file()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fsdp_cpu_offload_reaches_torchs_fsdp_and_a_cpu_run_trains_without_it(tmp_path, cache_dir, tiny_vae_dir):
    """`trainer.cpu_offload=true` becomes torch's CPUOffload(offload_params=True) (parameters and gradients kept on
    the CPU between uses, the optimizer stepping there). torch pins that host memory for GPU transfers, which needs
    CUDA; on a CPU run the parameters are on the CPU anyway, so it is left off with a warning and the run trains
    exactly like one without it: same weights, EMA and Adam moments after 2 steps."""
    from omegaconf import OmegaConf

    from cogvx_train.train.strategies import build_strategy

    for value in (True, False):
        strategy = build_strategy(OmegaConf.create({"strategy": "fsdp", "cpu_offload": value}))
        assert strategy.cpu_offload.offload_params is value
    args = [*(a for a in TINY_DIT if not a.startswith("optim.grad_clip=")), CLIP, f"model.vae.weights={tiny_vae_dir}",
            "trainer.devices=2", "trainer=fsdp", "trainer.max_steps=2"]
    runs, logs = {}, {}
    for offload in ("true", "false"):
        out = tmp_path / f"offload-{offload}"
        logs[offload] = launch([torchrun(2, free_port(), [*args, f"trainer.cpu_offload={offload}"])],
                               env_for(cache_dir, out), tmp_path)[0]
        runs[offload] = read_fsdp_checkpoint(run_dir(out) / "checkpoints" / "step-00000002.ckpt")
    assert "trainer.cpu_offload=true: this run's parameters live on the CPU already" in logs["true"]
    assert "CPU offload of parameters and gradients: off" in logs["true"], logs["true"][-3000:]
    assert "trainer.cpu_offload" not in logs["false"]
    on, off = runs["true"], runs["false"]
    assert on.weights.keys() == off.weights.keys() and on.step == off.step == 2
    for name, value in off.weights.items():
        torch.testing.assert_close(on.weights[name], value, rtol=0, atol=0, msg=name)
    for name, value in off.ema_weights().items():
        torch.testing.assert_close(on.ema_weights()[name], value, rtol=0, atol=0, msg=name)
    for moment in ("exp_avg", "exp_avg_sq"):
        for name, value in off.moments[moment].items():
            torch.testing.assert_close(on.moments[moment][name], value, rtol=0, atol=0, msg=f"{moment} {name}")

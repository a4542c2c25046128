"""Check the whole resolved config before anything heavy is built, and compute the derived values.

Every check adds one sentence saying what is wrong and what would work; :func:`validate` raises one
:class:`ConfigError` carrying all of them, so a user fixes every mistake in one go.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cogvx_train.config.errors import ConfigError

TASKS = ("vae", "dit", "curriculum")
ATTENTIONS = ("full", "spatial_temporal")
POSITIONS = ("rope3d", "sincos3d")
TEXT_FUSIONS = ("expert_adaln", "shared_adaln", "expert_ffn", "mmdit")
TIMESTEP_SAMPLINGS = ("uniform_per_rank", "iid")
GUIDANCE_SCHEDULES = ("constant", "dynamic_cosine")
LR_SCHEDULES = ("cosine", "constant", "linear")
DISC_KINDS = ("3d", "2d")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "single_device")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed")
TEXT_ENCODER_KINDS = ("tiny", "t5")


def nearest_4k_plus_1(n: int) -> str:
    lo = max(1, ((n - 1) // 4) * 4 + 1)
    hi = lo + 4
    return f"{lo} or {hi}" if lo != n else str(hi)


def _exists(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_num_frames(n: Any, key: str = "data.num_frames") -> str | None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"{key}={n!r} must be a positive integer of the form 4k+1 (e.g. 17 or 49)."
    if (n - 1) % 4 != 0:
        return f"{key}={n} is not of the form 4k+1 (the VAE compresses time 4x after frame 0); use {nearest_4k_plus_1(n)}."
    return None


def check_resolutions(resolutions: Any, key: str = "data.resolutions") -> list[str]:
    if not isinstance(resolutions, (list, ListConfig)) or len(resolutions) == 0:
        return [f"{key} must be a non-empty list of [height, width] pairs, e.g. [[256, 384]]."]
    errors = []
    for hw in resolutions:
        if not isinstance(hw, (list, ListConfig)) or len(hw) != 2 or not all(isinstance(v, int) for v in hw):
            errors.append(f"{key} entry {OmegaConf.to_container(hw) if OmegaConf.is_config(hw) else hw!r} "
                          "is not a [height, width] pair of integers, e.g. [480, 720].")
            continue
        h, w = hw
        bad = [v for v in (h, w) if v <= 0 or v % 16]
        if bad:
            fix = [max(16, round(v / 16) * 16) for v in (h, w)]
            errors.append(f"{key} entry [{h}, {w}] is not a multiple of 16 (8x VAE downsampling times the 2x2 "
                          f"patches); use [{fix[0]}, {fix[1]}].")
    pairs = [tuple(hw) for hw in resolutions if isinstance(hw, (list, ListConfig)) and len(hw) == 2]
    repeated = sorted({hw for hw in pairs if pairs.count(hw) > 1})
    if repeated:
        errors.append(f"{key} lists {', '.join(f'[{h}, {w}]' for h, w in repeated)} more than once; each entry is "
                      "one aspect-ratio bucket, so list each [height, width] once.")
    return errors


def _check_path(cfg: DictConfig, key: str, what: str, errors: list[str], special: tuple[str, ...] = ()) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value == "???" or str(value) in special:
        return
    if not Path(str(value)).expanduser().exists():
        errors.append(f"{key}={value} does not exist; point it at an existing {what}.")


def _weights_source(cfg: DictConfig, key: str, want: str, errors: list[str]) -> None:
    """The path holds `want` ('dit' | 'vae') weights: not the other stage's checkpoint, not a foreign file."""
    from cogvx_train.config.weights_source import check_weights_source

    value = OmegaConf.select(cfg, key)
    if (problem := check_weights_source(value, f"{key}={value}", want)) is not None:
        errors.append(problem)


def _manifest_errors(cfg: DictConfig) -> list[str]:
    """Read the user's manifests now (the datamodule reads them again once the model is built): not a manifest, a
    broken line, no usable row, files not where the rows say, or every video held out for validation."""
    d, errors = cfg.data, []
    use_images = d.use_images if isinstance(d.use_images, bool) else True
    for key, images in (("data.manifest", use_images), ("data.val_manifest", False)):
        path = OmegaConf.select(cfg, key)
        if not path or not Path(str(path)).expanduser().exists():
            continue  # the synthetic set (null), or reported by _check_path
        from cogvx_train.data.frame_pack import check_holdout, usable_rows
        from cogvx_train.data.manifest import read_manifest

        try:
            _, videos = usable_rows(read_manifest(Path(str(path)).expanduser()), images)
            if key == "data.manifest" and not d.val_manifest and isinstance(d.num_val_clips, int) and d.num_val_clips:
                check_holdout(d.num_val_clips, len(videos))
        except ConfigError as err:
            errors.append(f"{key}: {err}")
    return errors


def _boolean(cfg: DictConfig, key: str, errors: list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        errors.append(f"{key}={value!r} must be true or false.")


def _devices(cfg: DictConfig, errors: list[str]) -> None:
    """What Lightning accepts: a count (-1 = all), a list of device ids, "0,1", or auto."""
    value = OmegaConf.select(cfg, "trainer.devices")
    if value is None:  # a trainer config of your own may leave it out (Lightning's default)
        return
    ids = OmegaConf.to_container(value) if isinstance(value, ListConfig) else None
    ok = (value == "auto" or (_is_number(value) and isinstance(value, int) and (value > 0 or value == -1))
          or (isinstance(value, str) and all(v.strip().isdigit() for v in value.split(",")))
          or (ids is not None and len(ids) > 0 and all(isinstance(v, int) and v >= 0 for v in ids)))
    if not ok:
        errors.append(f"trainer.devices={value!r} must be a number of devices per node (e.g. 1 or 8; -1 = all), a "
                      "list of device ids such as [0, 1], or auto.")


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...], errors: list[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        errors.append(f"{key}={value!r} is not one of {', '.join(choices)}.")


def _positive(cfg: DictConfig, key: str, errors: list[str], allow_zero: bool = False, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    ok = _is_number(value) and (value >= 0 if allow_zero else value > 0) and (not integer or isinstance(value, int))
    if not ok:
        kind = "integer" if integer else "number"
        bound = "≥ 0" if allow_zero else "> 0"
        errors.append(f"{key}={value!r} must be {'an' if integer else 'a'} {kind} {bound}.")


def _context_parallel_clip_errors(cfg: DictConfig, cp: int) -> list[str]:
    """The clips must split over ``cp`` ranks on the VAE's GroupNorm windows (context_parallel.py's rule)."""
    from cogvx_train.vae import VAE_SIZES
    from cogvx_train.vae.context_parallel import check_clip_split

    d, vae = cfg.data, cfg.model.vae
    errors = []
    if d.use_images:
        errors.append(f"context_parallel_size={cp} splits video clips along time and a still has one frame; set "
                      "data.use_images=false (train on stills in a stage without context parallelism).")
    if vae.size not in VAE_SIZES or check_num_frames(d.num_frames) is not None:
        return errors  # reported on their own
    arch = VAE_SIZES[vae.size]
    overrides = OmegaConf.to_container(vae.overrides) if OmegaConf.is_config(vae.overrides) else vae.overrides or {}
    windows = [overrides.get(k, getattr(arch, k)) for k in ("encoder_norm_window", "decoder_norm_window")]
    ratio = overrides.get("temporal_compression_ratio", arch.temporal_compression_ratio)
    try:
        check_clip_split(d.num_frames, cp, ratio, *windows)
    except ValueError as err:
        errors.append(f"data.num_frames={d.num_frames} with context_parallel_size={cp}: {err}")
    return errors


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ConfigError listing every mistake in ``cfg``; return quietly when it is sound."""
    errors: list[str] = []
    missing = [k for k in ("task", "stage_name") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ConfigError("no stage is selected; add stage=<name> (vae_a1, vae_a2, dit_b1, dit_b2, dit_b3, dit_b4).")
    if OmegaConf.select(cfg, "requires_init_from") and not cfg.init_from and not cfg.resume:
        errors.append(f"stage {cfg.stage_name} starts from the previous stage's weights; add init_from=<run "
                      "directory or checkpoint of that stage>.")
    task = cfg.task
    if task == "curriculum":
        stages = list(OmegaConf.select(cfg, "curriculum.stages") or [])
        from importlib.resources import files

        known = {p.name.removesuffix(".yaml") for p in (files("cogvx_train.conf") / "stage").iterdir()}
        bad = [s for s in stages if s not in known or s.startswith("curriculum")]
        if not stages or bad:
            raise ConfigError(f"curriculum.stages={stages} must be a non-empty list of stages, e.g. "
                              "[dit_b1,dit_b2]; unknown: " + ", ".join(map(str, bad or ["(empty list)"])) + ".")
        return
    if task not in TASKS:
        errors.append(f"task={task!r} is not one of {', '.join(TASKS)}.")

    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        errors.append(f"seed={cfg.seed!r} must be an integer, e.g. 42.")

    # data
    d = cfg.data
    _boolean(cfg, "data.use_images", errors)
    if (e := check_num_frames(d.num_frames)) is not None:
        errors.append(e)
    errors += check_resolutions(d.resolutions)
    fps = OmegaConf.to_container(d.fps) if OmegaConf.is_config(d.fps) else d.fps
    fps_list = fps if isinstance(fps, list) else [fps]
    if not fps_list or not all(_is_number(f) and f > 0 for f in fps_list):
        errors.append(f"data.fps={fps!r} must be a positive frame rate or a list of them, e.g. 8 or [8, 16].")
    _positive(cfg, "data.batch_size", errors, integer=True)
    if d.image_batch_size != d.batch_size:  # by default it follows data.batch_size: one mistake, one sentence
        _positive(cfg, "data.image_batch_size", errors, integer=True)
    _positive(cfg, "data.num_val_clips", errors, allow_zero=True, integer=True)
    _positive(cfg, "data.num_workers", errors, allow_zero=True, integer=True)
    rate = d.max_failure_rate
    if not _is_number(rate) or not 0 <= rate <= 1:
        errors.append(f"data.max_failure_rate={rate!r} must be a fraction in [0, 1], e.g. 0.01.")
    _check_path(cfg, "data.manifest", "manifest file (build one with `cogvx-data manifest <folder> --out m.jsonl`)",
                errors)
    _check_path(cfg, "data.val_manifest", "manifest file", errors)
    if not d.latent_cache:
        errors += _manifest_errors(cfg)
    elif Path(str(d.latent_cache)).expanduser().is_dir():
        from cogvx_train.data.latent_cache import read_index

        try:
            read_index(d.latent_cache)
        except ValueError as err:
            errors.append(f"data.latent_cache: {err}")
    _check_path(cfg, "data.latent_cache", "directory written by `cogvx-data precompute`", errors)
    _check_path(cfg, "init_from", "checkpoint file, run directory or diffusers-format directory", errors)
    _check_path(cfg, "resume", "run directory (or its checkpoints/last.ckpt)", errors)
    if cfg.init_from and not cfg.resume and task in ("vae", "dit"):  # a resumed run ignores init_from
        _weights_source(cfg, "init_from", task, errors)

    # optimisation
    _positive(cfg, "optim.lr", errors)
    _positive(cfg, "optim.warmup_steps", errors, allow_zero=True, integer=True)
    _positive(cfg, "optim.grad_clip", errors, allow_zero=True)
    _positive(cfg, "optim.weight_decay", errors, allow_zero=True)
    _choice(cfg, "optim.schedule", LR_SCHEDULES, errors)
    steps, warmup = OmegaConf.select(cfg, "trainer.max_steps"), cfg.optim.warmup_steps
    if _is_number(steps) and _is_number(warmup) and steps > 0 and warmup > steps:
        errors.append(f"optim.warmup_steps={warmup} is longer than the run (trainer.max_steps={steps}); "
                      f"use at most {steps} warmup steps or a longer run.")
    if OmegaConf.select(cfg, "ema.enabled"):
        decay = cfg.ema.decay
        if not _is_number(decay) or not 0 < decay < 1:
            errors.append(f"ema.decay={decay!r} must lie strictly between 0 and 1, e.g. 0.9999.")
    _positive(cfg, "checkpoint.every_n_steps", errors, integer=True)
    _positive(cfg, "checkpoint.keep_last_k", errors, integer=True)

    # trainer
    t = cfg.trainer
    if not t.get("fast_dev_run"):
        _positive(cfg, "trainer.max_steps", errors, integer=True)
    _choice(cfg, "trainer.strategy", STRATEGIES, errors)
    _devices(cfg, errors)
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    if interval is not None and not (_is_number(interval) and (interval >= 1 if isinstance(interval, int)
                                                               else 0 < interval <= 1)):
        errors.append(f"trainer.val_check_interval={interval!r} must be a number of steps ≥ 1 (e.g. 1000) or a "
                      "fraction of an epoch in (0, 1].")
    if OmegaConf.select(cfg, "trainer.log_every_n_steps") is not None:
        _positive(cfg, "trainer.log_every_n_steps", errors, allow_zero=True, integer=True)
    if OmegaConf.select(cfg, "trainer.num_nodes") is not None:
        _positive(cfg, "trainer.num_nodes", errors, integer=True)
    wrap = OmegaConf.select(cfg, "trainer.wrap_blocks")
    if wrap is not None and not isinstance(wrap, bool):
        errors.append(f"trainer.wrap_blocks={wrap!r} must be true (one FSDP unit per transformer block) or false "
                      "(the whole model one unit).")
    offload = OmegaConf.select(cfg, "trainer.cpu_offload")
    if offload is not None and not isinstance(offload, bool):
        errors.append(f"trainer.cpu_offload={offload!r} must be true (FSDP keeps parameters and gradients on the CPU "
                      "between uses) or false.")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    if accumulate is not None:  # a trainer config of your own may leave it out (= 1)
        _positive(cfg, "trainer.accumulate_grad_batches", errors, integer=True)
    if task == "vae" and accumulate not in (None, 1):
        errors.append(f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} does not apply to VAE stages: "
                      "their generator and discriminator step on every batch (manual optimisation); use 1 and a "
                      "larger data.batch_size or more ranks.")
    if str(t.precision) not in PRECISIONS:
        errors.append(f"trainer.precision={t.precision!r} is not one of {', '.join(PRECISIONS)}.")

    # model
    m = cfg.model
    from cogvx_train.vae import VAE_SIZES

    if m.vae.size not in VAE_SIZES:
        errors.append(f"model.vae.size={m.vae.size!r} is not a known VAE size; use one of {', '.join(VAE_SIZES)}.")
    factor = OmegaConf.select(cfg, "model.vae.scaling_factor")
    if factor is not None and not (_is_number(factor) and factor > 0):
        errors.append(f"model.vae.scaling_factor={factor!r} must be a number > 0, or null (VAE stages measure it "
                      "on the validation clips; DiT stages take the VAE's own).")
    if task == "vae":
        v = cfg.vae_loss
        for key in ("l1_weight", "lpips_weight", "kl_weight", "disc_weight"):
            _positive(cfg, f"vae_loss.{key}", errors, allow_zero=True)
        _positive(cfg, "vae_loss.disc_start", errors, allow_zero=True, integer=True)
        _choice(cfg, "vae_loss.disc_kind", DISC_KINDS, errors)
        if v.lpips_frames != "all" and not (isinstance(v.lpips_frames, int) and v.lpips_frames > 0):
            errors.append(f"vae_loss.lpips_frames={v.lpips_frames!r} must be 'all' or a positive number of frames.")
        _check_path(cfg, "vae_loss.lpips_backbone_path", "torchvision backbone weights file", errors)
        cp = OmegaConf.select(cfg, "context_parallel_size", default=1)
        if not isinstance(cp, int) or cp < 1:
            errors.append(f"context_parallel_size={cp!r} must be a positive integer.")
        elif world_size % cp:
            errors.append(f"context_parallel_size={cp} does not divide the world size {world_size}; "
                          f"launch a multiple of {cp} ranks.")
        if isinstance(cp, int) and cp > 1:
            errors += _context_parallel_clip_errors(cfg, cp)
    if task == "vae" and str(t.strategy).startswith("deepspeed"):
        errors.append(f"trainer={t.strategy} runs one optimizer per model and the VAE stages train two (G and D); "
                      "use trainer=ddp for vae stages.")
    if task == "vae" and str(t.strategy) == "fsdp":
        errors.append("trainer=fsdp trains the DiT stages; the VAE stages step G and D themselves inside the "
                      "forward (manual optimisation), which FSDP's parameter views do not allow: use trainer=ddp.")
    if task == "dit":
        from cogvx_train.dit import DIT_SIZES

        if m.size not in DIT_SIZES:
            errors.append(f"model.size={m.size!r} is not a known DiT size; use one of {', '.join(DIT_SIZES)}.")
        _choice(cfg, "model.attention", ATTENTIONS, errors)
        _choice(cfg, "model.positions", POSITIONS, errors)
        _choice(cfg, "model.text_fusion", TEXT_FUSIONS, errors)
        _choice(cfg, "diffusion.timestep_sampling", TIMESTEP_SAMPLINGS, errors)
        _choice(cfg, "sampling.guidance_schedule", GUIDANCE_SCHEDULES, errors)
        _positive(cfg, "diffusion.snr_shift", errors)
        _positive(cfg, "sampling.num_steps", errors, integer=True)
        scale = OmegaConf.select(cfg, "sampling.guidance_scale")
        if not (_is_number(scale) and scale >= 0):  # else the first validation samples fail, deep into the run
            errors.append(f"sampling.guidance_scale={scale!r} must be a number ≥ 0 (1 = no guidance, 6 is the "
                          "released value).")
        drop = cfg.diffusion.caption_dropout
        if not _is_number(drop) or not 0 <= drop < 1:
            errors.append(f"diffusion.caption_dropout={drop!r} must be a probability in [0, 1), e.g. 0.1.")
        uses_cache = d.latent_cache is not None
        if not uses_cache:
            _choice(cfg, "model.text_encoder.kind", TEXT_ENCODER_KINDS, errors)
            _positive(cfg, "model.text_encoder.max_length", errors, integer=True)
            if m.text_encoder.kind == "t5" and not m.text_encoder.path:
                errors.append("model.text_encoder.path is not set; point it at a local T5 encoder directory "
                              "(config.json, weights, spiece.model), or use model=tiny for a test run.")
            _check_path(cfg, "model.text_encoder.path", "T5 encoder directory", errors)
            if m.vae.weights is None:
                errors.append("model.vae.weights is not set; the DiT trains on a frozen VAE: give a vae stage "
                              "checkpoint or a diffusers-format VAE directory (or data.latent_cache=<precomputed>).")
            else:
                _check_path(cfg, "model.vae.weights", "VAE checkpoint or diffusers-format VAE directory", errors,
                            special=("demo",))
                if m.vae.weights != "demo":
                    _weights_source(cfg, "model.vae.weights", "vae", errors)
    if errors:
        raise ConfigError(errors)


def derive(cfg: DictConfig, world_size: int = 1) -> dict[str, Any]:
    """Values that follow from the config, computed once, logged and saved with the run's config."""
    if cfg.task == "curriculum":
        return {"stages": list(cfg.curriculum.stages)}
    d = cfg.data
    latent_frames = (d.num_frames - 1) // 4 + 1
    buckets = []
    for h, w in d.resolutions:
        entry = {"resolution": [h, w], "latent_shape": [16, latent_frames, h // 8, w // 8]}
        if cfg.task == "dit":
            entry["vision_tokens"] = latent_frames * (h // 16) * (w // 16)
        buckets.append(entry)
    out: dict[str, Any] = {
        "world_size": world_size,
        "global_batch_size": d.batch_size * world_size,
        "latent_frames": latent_frames,
        "buckets": buckets,
    }
    if cfg.task == "dit":
        out["timestep_interval_per_rank"] = [
            [round(r * cfg.diffusion.num_train_timesteps / world_size, 3),
             round((r + 1) * cfg.diffusion.num_train_timesteps / world_size, 3)]
            for r in range(world_size)
        ] if cfg.diffusion.timestep_sampling == "uniform_per_rank" else "iid over [0, 1000)"
    if cfg.task == "vae":
        cp = OmegaConf.select(cfg, "context_parallel_size", default=1) or 1
        out["context_parallel_size"] = cp
        out["data_parallel_size"] = max(1, world_size // cp)
        out["global_batch_size"] = d.batch_size * out["data_parallel_size"]  # a group of cp ranks shares its clips
    return out

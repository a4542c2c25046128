"""The frozen halves of the DiT stages: the 3D VAE that turns clips into latents and T5 that turns captions into
embeddings. Neither is trained, neither is part of the DiT's optimizer or checkpoint: both are rebuilt from their
specs (plain values) whenever a run starts, resumes or samples.

    x0 = z * scaling_factor,   z = mean + exp(logvar / 2) * eps,   (mean, logvar) = VAE.encode(video)

The posterior is re-sampled every training step (a fresh eps from a generator keyed on (seed, step, rank)), both
when encoding on the fly and when reading a latent cache that stores (mean, logvar): the two paths give the same
latents for the same step. Images are 1-frame videos (the causal VAE encodes frame 0 on its own). Encoding runs under whatever autocast
is active (the trainer's bf16-mixed on GPU, as the released pipelines encode in bf16); the posterior is returned
in fp32 and everything downstream of it (sampling, scaling, noising) is fp32.

VAE weights can come from
  * a vae-stage run directory or checkpoint (VAETrainingModule: "vae." weights, its EMA under "vae_ema" preferred;
    the architecture is rebuilt from the checkpoint's own hyper-parameters),
  * a diffusers AutoencoderKLCogVideoX directory (or a pipeline root with vae/),
  * nothing (None): a randomly initialised VAE of the named size, for tests only (warned).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cogvx_train.config.plain import plain_config

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class VAESpec:
    """Which frozen VAE to build: the `model.vae` config group as plain values."""

    size: str = "tiny"
    weights: str | None = None  # vae-stage run dir / .ckpt, diffusers dir, or None (random, tests only)
    scaling_factor: float | None = None  # None: the VAE's own (1.15258426 for 2B, 0.7 for 5B)
    factorized: bool = False
    overrides: dict = field(default_factory=dict)  # other VAEConfig fields (norm windows, tiles, ...)

    @classmethod
    def from_any(cls, value: "VAESpec | dict[str, Any] | None") -> "VAESpec":
        return plain_config(cls, value, "model.vae")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which frozen text encoder to build: the `model.text_encoder` config group as plain values."""

    kind: str = "tiny"  # "t5" (local path) | "tiny" (random T5 + ByT5 tokenizer, tests and demo)
    path: str | None = None
    max_length: int = 226

    @classmethod
    def from_any(cls, value: "TextEncoderSpec | dict[str, Any] | None") -> "TextEncoderSpec":
        return plain_config(cls, value, "model.text_encoder")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ loading
def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def resolve_vae_checkpoint(path: str | os.PathLike) -> tuple[str, Path]:
    """("ckpt" | "diffusers", file or folder) for a VAE weights path, or one sentence saying what would work."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return "ckpt", candidate
        for folder in (p, p / "vae"):
            if (folder / "config.json").is_file():
                return "diffusers", folder
    elif p.is_file():
        if p.name == "config.json" or p.suffix == ".safetensors":
            return "diffusers", p.parent
        return "ckpt", p
    raise ValueError(f"VAE weights {str(p)!r} are neither a vae-stage run directory or .ckpt file nor a diffusers "
                     "AutoencoderKLCogVideoX directory (config.json + diffusion_pytorch_model.safetensors).")


# Fields that define the VAE's architecture: with weights given, those stored with the weights win.
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "norm_num_groups", "temporal_compression_ratio", "factorized")


def runtime_overrides(spec: VAESpec) -> dict[str, Any]:
    """The spec's overrides minus architecture (which comes from the weights' own config)."""
    return {k: v for k, v in spec.overrides.items() if k not in ARCHITECTURE_KEYS}


def _vae_from_stage_checkpoint(path: Path, spec: VAESpec):
    """VAE of a VAETrainingModule checkpoint, built from the checkpoint's own hyper-parameters, EMA preferred."""
    from cogvx_train.vae import build_vae

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("vae.") for k in state):
        raise ValueError(f"{path} is not a vae-stage checkpoint (it has no 'vae.' weights); give a vae run "
                         "directory, its checkpoints/*.ckpt, or a diffusers-format VAE directory.")
    hparams = ckpt.get("hyper_parameters") or {}
    size = hparams.get("vae_size", spec.size)
    overrides = dict(hparams.get("vae_overrides") or {})
    if "vae_scaling_factor" in ckpt:  # the VAE's factor when saved (measured ones change during training)
        overrides["scaling_factor"] = float(ckpt["vae_scaling_factor"])
    overrides.update(runtime_overrides(spec))  # non-architectural knobs (norm windows, tiles) may change
    if size != spec.size:
        log.info("VAE checkpoint %s holds a %r VAE (model.vae.size says %r): using the checkpoint's", path, size,
                 spec.size)
    vae = build_vae(size, **overrides)
    weights = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
    if "vae_ema" in ckpt:  # the averaged weights are the ones the VAE stage validates and exports
        weights.update(ckpt["vae_ema"]["shadow"])
    missing, unexpected = vae.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a {size!r} VAE with overrides {overrides}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    return vae


def load_frozen_vae(spec: VAESpec | dict[str, Any]):
    """The frozen CausalVAE of `spec` on the CPU, fp32, eval mode, requires_grad False."""
    from cogvx_train.vae import build_vae, load_diffusers_vae

    spec = VAESpec.from_any(spec)
    if spec.weights is None:
        log.warning("model.vae.weights is None: the DiT stage uses a RANDOMLY initialised %r VAE (fine for tests, "
                    "meaningless for real training).", spec.size)
        overrides = dict(spec.overrides)
        overrides.setdefault("factorized", spec.factorized)
        if spec.scaling_factor is not None:
            overrides.setdefault("scaling_factor", spec.scaling_factor)
        return _freeze(build_vae(spec.size, **overrides))
    kind, where = resolve_vae_checkpoint(spec.weights)
    vae = _vae_from_stage_checkpoint(where, spec) if kind == "ckpt" else load_diffusers_vae(where, **runtime_overrides(spec))
    if spec.scaling_factor is not None and abs(vae.scaling_factor - spec.scaling_factor) > 1e-6:
        log.warning("model.vae.scaling_factor=%s differs from the one stored with the VAE weights (%s); the DiT "
                    "uses %s.", spec.scaling_factor, vae.scaling_factor, spec.scaling_factor)
    return _freeze(vae)


def load_frozen_text_encoder(spec: TextEncoderSpec | dict[str, Any]):
    """The frozen FrozenT5Encoder of `spec` on the CPU (T5: bf16 as released; tiny: fp32)."""
    from cogvx_train.text import build_text_encoder

    spec = TextEncoderSpec.from_any(spec)
    return _freeze(build_text_encoder(spec.kind, spec.path, spec.max_length))


def weights_fingerprint(path: str | os.PathLike | None, full_hash_limit: int = 2**30) -> dict[str, Any]:
    """What a latent cache records about the VAE weights it was made with: resolved path, size, sha256 (of the
    whole file up to `full_hash_limit` bytes, else of its first and last 64 MiB plus the size)."""
    if path is None:
        return {"path": None, "sha256": None, "note": "random VAE (no weights)"}
    kind, where = resolve_vae_checkpoint(path)
    files = [where] if where.is_file() else sorted(where.glob("*.safetensors")) + [where / "config.json"]
    digest = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= full_hash_limit:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
            else:
                digest.update(fh.read(1 << 26))
                fh.seek(size - (1 << 26))
                digest.update(fh.read())
    return {"path": str(where.resolve()), "kind": kind, "bytes": total, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------------------ encoding
def keyed_generator(seed: int, *key: Any) -> torch.Generator:
    """A CPU generator seeded by a 63-bit hash of (seed, *key): one independent, reproducible stream per purpose,
    step and rank, that never touches the global RNG (and does not depend on the device)."""
    text = ":".join(str(k) for k in (seed, *key))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def randn_like_on_cpu(like: Tensor, generator: torch.Generator) -> Tensor:
    """N(0, 1) of like's shape drawn on the CPU (device-independent values), moved to like's device, fp32."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def sample_latents(mean: Tensor, logvar: Tensor, generator: torch.Generator, scaling_factor: float) -> Tensor:
    """x0 = (mean + exp(logvar / 2) eps) * scaling_factor in fp32: the diffusion model's clean latents."""
    mean, logvar = mean.float(), logvar.float()
    eps = randn_like_on_cpu(mean, generator)
    return (mean + torch.exp(0.5 * logvar) * eps) * scaling_factor


@torch.no_grad()
def encode_video(vae, video: Tensor, chunk_frames: int | None = None, tile: bool = False) -> tuple[Tensor, Tensor]:
    """Posterior (mean, logvar), fp32 [B, 16, T', H/8, W/8], of a video batch [B, 3, T, H, W] in [-1, 1]."""
    posterior = vae.encode(video.to(next(vae.parameters()).dtype), chunk_frames=chunk_frames, tile=tile)
    return posterior.mean.float(), posterior.logvar.float()


def latent_shape(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, T', h, w) of the latents of a [3, num_frames, height, width] clip, with a sentence if it does not fit."""
    cfg = vae.config
    ratio, s = cfg.temporal_compression_ratio, cfg.spatial_compression
    if num_frames < 1 or (num_frames - 1) % ratio or height % s or width % s:
        raise ValueError(f"a {num_frames}x{height}x{width} clip does not fit the VAE: frames must be {ratio}k+1 and "
                         f"height/width multiples of {s} (x2 for the DiT patches), e.g. 49x480x720.")
    return cfg.latent_channels, (num_frames - 1) // ratio + 1, height // s, width // s


class FrozenEncoders:
    """The frozen VAE and text encoder of a DiT run, kept OUT of the LightningModule's child modules: they never
    reach the optimizer, the state_dict, DDP/FSDP/DeepSpeed wrapping or a bf16-true cast. Either may be None
    (a latent-cache run needs neither to train); `to()` moves both."""

    def __init__(self, vae=None, text_encoder=None, scaling_factor: float | None = None) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        if scaling_factor is None:
            scaling_factor = vae.scaling_factor if vae is not None else None
        self.scaling_factor = scaling_factor

    @classmethod
    def build(cls, vae: VAESpec | dict | None, text_encoder: TextEncoderSpec | dict | None,
              load_vae: bool = True, load_text: bool = True) -> "FrozenEncoders":
        vae_spec = VAESpec.from_any(vae)
        loaded = load_frozen_vae(vae_spec) if load_vae else None
        scale = vae_spec.scaling_factor if vae_spec.scaling_factor is not None else (
            loaded.scaling_factor if loaded is not None else None)
        text = load_frozen_text_encoder(text_encoder) if load_text else None
        return cls(loaded, text, scale)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder) if m is not None]

    def to(self, device: torch.device | str) -> "FrozenEncoders":
        device = torch.device(device)
        for module in self.modules():
            if next(module.parameters()).device != device:
                module.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        if self.text_encoder is None:
            raise ValueError("this run has no text encoder loaded (latent-cache run); pass text embeddings instead.")
        return self.text_encoder(list(captions))

    @torch.no_grad()
    def encode_video(self, video: Tensor, chunk_frames: int | None = None) -> tuple[Tensor, Tensor]:
        if self.vae is None:
            raise ValueError("this run has no VAE loaded (latent-cache run); pass cached latents instead.")
        return encode_video(self.vae, video, chunk_frames)

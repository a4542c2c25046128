"""Load and export diffusers AutoencoderKLCogVideoX checkpoints (config.json + diffusion_pytorch_model.safetensors).

Our module names mirror diffusers', so the key map is the identity; loading checks that both key sets and every
shape agree and names what differs otherwise.

GroupNorm windows are not part of the diffusers config. Loading gives the windows diffusers itself uses by
default (8 input frames / 2 latent frames, see blocks.py); pass ``encoder_norm_window=None,
decoder_norm_window=None`` for whole-clip statistics (SAT's one-pass encode, context-parallel training).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cogvx_train.vae.autoencoder import CausalVAE, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKLCogVideoX"

# diffusers config fields that map one-to-one onto VAEConfig fields
_SHARED_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "norm_eps", "temporal_compression_ratio", "scaling_factor",
)
# diffusers options our model does not implement, with the value it must have
_REQUIRED = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": None,
             "latents_mean": None, "latents_std": None, "invert_scale_latents": False}


def _resolve(path: str | Path) -> Path:
    """The folder holding config.json: the path itself, its vae/ subfolder, or the folder of a weights file."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    for candidate in (path, path / "vae"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise ValueError(
        f"No {CONFIG_NAME} + {WEIGHTS_NAME} in {path} or {path / 'vae'}; pass a diffusers VAE folder or a "
        "pipeline folder with a vae/ subfolder."
    )


def config_from_diffusers(raw: dict, **overrides) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKLCogVideoX config dict (unknown extras are ignored)."""
    if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"Expected a {CLASS_NAME} config, got _class_name={raw['_class_name']!r}.")
    for key, value in _REQUIRED.items():
        if raw.get(key, value) != value:
            raise ValueError(f"This VAE supports {key}={value!r} only, the checkpoint has {raw[key]!r}.")
    for key, kind in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
        if any(t != kind for t in raw.get(key, [kind])):
            raise ValueError(f"Every entry of {key} must be {kind!r}, got {raw[key]}.")
    fields = {k: raw[k] for k in _SHARED_FIELDS if k in raw}
    if "block_out_channels" in fields:
        fields["block_out_channels"] = tuple(fields["block_out_channels"])
    if "temporal_compression_ratio" in fields:
        fields["temporal_compression_ratio"] = int(fields["temporal_compression_ratio"])
    fields.update(overrides)
    return VAEConfig(**fields)


def load_diffusers_vae(path_or_dir: str | Path, **overrides) -> CausalVAE:
    """A CausalVAE with the weights of a diffusers AutoencoderKLCogVideoX folder (fp32, on CPU).

    overrides: VAEConfig fields diffusers does not store (norm windows, logvar clamp, tiles).
    """
    folder = _resolve(path_or_dir)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    vae = CausalVAE(config_from_diffusers(raw, **overrides))
    state = load_file(str(folder / WEIGHTS_NAME))
    own = vae.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not match the config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"Shape mismatch for {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)}, "
                         f"model {tuple(own[wrong[0]].shape)} ({len(wrong)} tensors differ).")
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    return vae


def export_diffusers_vae(vae: CausalVAE, out_dir: str | Path) -> Path:
    """Write config.json + safetensors that diffusers' AutoencoderKLCogVideoX.from_pretrained loads."""
    cfg = vae.config
    if cfg.factorized:
        raise ValueError("A factorized VAE has no diffusers counterpart; export a VAE built with factorized=False.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    levels = len(cfg.block_out_channels)
    raw = {
        "_class_name": CLASS_NAME,
        **{k: getattr(cfg, k) for k in _SHARED_FIELDS},
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["CogVideoXDownBlock3D"] * levels,
        "up_block_types": ["CogVideoXUpBlock3D"] * levels,
        **_REQUIRED,
        "force_upcast": True,
        "sample_height": 480,
        "sample_width": 720,
    }
    (out / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out

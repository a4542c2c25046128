"""Checkpoint formats of the expert transformer.

diffusers (`CogVideoXTransformer3DModel`, the released 2B sincos and 5B RoPE layouts): a directory with config.json
and diffusion_pytorch_model.safetensors, or shards listed in diffusion_pytorch_model.safetensors.index.json.
Our parameter names equal diffusers' except for three renames (DIFFUSERS_RENAMES). Only the paper's model
(text_fusion="expert_adaln", attention="full") has a diffusers equivalent; every other ablation variant is saved
in our own format (save_dit / load_dit: dit_config.json + model.safetensors).

A diffusers RoPE model does not compute its own rotary table: pass it `image_rotary_emb=rope3d_frequencies(...)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cogvx_train.dit.transformer import DiTConfig, ExpertTransformer

DIFFUSERS_RENAMES = (("ff.net.0.proj.", "ff.proj_in."), ("ff.net.2.", "ff.proj_out."),
                     ("attn1.to_out.0.", "attn1.to_out."))
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
NATIVE_CONFIG, NATIVE_WEIGHTS = "dit_config.json", "model.safetensors"
TEMPORAL_COMPRESSION = 4  # diffusers stores sample_frames in pixel frames: (latent - 1) * 4 + 1

# diffusers config fields our model does not implement, with the only value we accept
_FIXED_FIELDS = {"flip_sin_to_cos": True, "freq_shift": 0, "ofs_embed_dim": None, "patch_size_t": None,
                 "attention_bias": True, "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
                 "norm_elementwise_affine": True, "use_learned_positional_embeddings": False, "patch_bias": True,
                 "dropout": 0.0}


def from_diffusers_key(key: str) -> str:
    for theirs, ours in DIFFUSERS_RENAMES:
        key = key.replace(theirs, ours)
    return key


def to_diffusers_key(key: str) -> str:
    for theirs, ours in DIFFUSERS_RENAMES:
        key = key.replace(ours, theirs)
    return key


def config_from_diffusers(raw: dict) -> DiTConfig:
    """Map a diffusers CogVideoXTransformer3DModel config.json to DiTConfig (diffusers' defaults fill gaps)."""
    if raw.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise ValueError(f"config.json describes a {raw['_class_name']}, not a CogVideoXTransformer3DModel")
    for field, accepted in _FIXED_FIELDS.items():
        if field in raw and raw[field] != accepted:
            raise ValueError(f"diffusers config has {field}={raw[field]!r}; this loader supports the CogVideoX 1.0 "
                             f"text-to-video layouts (2B, 5B), which use {field}={accepted!r}")
    frames = raw.get("sample_frames", 49)
    ratio = raw.get("temporal_compression_ratio", TEMPORAL_COMPRESSION)
    out_channels = raw.get("out_channels", 16)
    return DiTConfig(
        num_layers=raw.get("num_layers", 30), num_heads=raw.get("num_attention_heads", 30),
        head_dim=raw.get("attention_head_dim", 64), in_channels=raw.get("in_channels", 16),
        out_channels=raw.get("in_channels", 16) if out_channels is None else out_channels,
        time_embed_dim=raw.get("time_embed_dim", 512), text_embed_dim=raw.get("text_embed_dim", 4096),
        patch_size=raw.get("patch_size", 2), norm_eps=raw.get("norm_eps", 1e-5),
        max_text_tokens=raw.get("max_text_seq_length", 226),
        positions="rope3d" if raw.get("use_rotary_positional_embeddings", False) else "sincos3d",
        spatial_interpolation_scale=raw.get("spatial_interpolation_scale", 1.875),
        temporal_interpolation_scale=raw.get("temporal_interpolation_scale", 1.0),
        sample_frames=(frames - 1) // ratio + 1, sample_height=raw.get("sample_height", 60),
        sample_width=raw.get("sample_width", 90))


def config_to_diffusers(cfg: DiTConfig) -> dict:
    """DiTConfig -> diffusers config.json fields; raises for variants diffusers cannot represent."""
    if cfg.text_fusion != "expert_adaln" or cfg.attention != "full":
        raise ValueError(f"text_fusion={cfg.text_fusion!r} with attention={cfg.attention!r} has no diffusers "
                         "CogVideoXTransformer3DModel equivalent (only expert_adaln with full attention does); "
                         "save it in our own format with save_dit(model, out_dir)")
    if cfg.ffn_mult != 4 or (cfg.positions == "rope3d" and cfg.rope_theta != 1e4):
        raise ValueError("diffusers' CogVideoX transformer fixes the FFN width at 4x and RoPE theta at 1e4; "
                         f"this model has ffn_mult={cfg.ffn_mult}, rope_theta={cfg.rope_theta}")
    return {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.30.0",
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "time_embed_dim": cfg.time_embed_dim,
            "text_embed_dim": cfg.text_embed_dim, "num_layers": cfg.num_layers,
            "sample_width": cfg.sample_width, "sample_height": cfg.sample_height,
            "sample_frames": (cfg.sample_frames - 1) * TEMPORAL_COMPRESSION + 1, "patch_size": cfg.patch_size,
            "temporal_compression_ratio": TEMPORAL_COMPRESSION, "max_text_seq_length": cfg.max_text_tokens,
            "norm_eps": cfg.norm_eps, "spatial_interpolation_scale": cfg.spatial_interpolation_scale,
            "temporal_interpolation_scale": cfg.temporal_interpolation_scale,
            "use_rotary_positional_embeddings": cfg.positions == "rope3d", **_FIXED_FIELDS}


def _checkpoint_dir(path: str | Path) -> Path:
    """A transformer directory (config.json + weights) or a pipeline root holding transformer/."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; pass the diffusers transformer directory "
                         "(config.json + diffusion_pytorch_model*.safetensors) or a pipeline root with transformer/")
    return path


def _read_weights(directory: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if (directory / INDEX_NAME).exists():
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(directory / shard, device=str(device)))
        return state
    if (directory / WEIGHTS_NAME).exists():
        return load_file(directory / WEIGHTS_NAME, device=str(device))
    raise ValueError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors checkpoints "
                     "are read; convert .bin weights with diffusers first)")


def _load_state(cfg: DiTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None, source: Path):
    """Build on the meta device and adopt the checkpoint tensors (no second copy of the weights)."""
    with torch.device("meta"):
        model = ExpertTransformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape for its config: {wrong[:5]}")
    dtype = dtype or next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model


def load_diffusers_transformer(path: str | Path, dtype: torch.dtype | None = None,
                               device: str | torch.device = "cpu") -> ExpertTransformer:
    """ExpertTransformer from a diffusers CogVideoXTransformer3DModel checkpoint (single file or sharded)."""
    directory = _checkpoint_dir(path)
    cfg = config_from_diffusers(json.loads((directory / "config.json").read_text()))
    state = {from_diffusers_key(k): v for k, v in _read_weights(directory, device).items()}
    return _load_state(cfg, state, dtype, directory)


def _save_sharded(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))


def export_diffusers_transformer(model: ExpertTransformer, out_dir: str | Path,
                                 max_shard_bytes: int = 10 * 2**30) -> Path:
    """Write a directory CogVideoXTransformer3DModel.from_pretrained(out_dir) loads; returns out_dir."""
    config = config_to_diffusers(model.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {to_diffusers_key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _save_sharded(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def save_dit(model: ExpertTransformer, out_dir: str | Path) -> Path:
    """Our own format for every variant: dit_config.json (the DiTConfig fields) + model.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, out_dir / NATIVE_WEIGHTS, metadata={"format": "pt"})
    meta = {"format": "cogvx_train.dit", "version": 1, "config": dataclasses.asdict(model.config)}
    (out_dir / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2))
    return out_dir


def load_dit(path: str | Path, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> ExpertTransformer:
    """Inverse of save_dit."""
    directory = Path(path)
    if not (directory / NATIVE_CONFIG).exists():
        raise ValueError(f"{directory} has no {NATIVE_CONFIG}; for a diffusers checkpoint use "
                         "load_diffusers_transformer")
    meta = json.loads((directory / NATIVE_CONFIG).read_text())
    if meta.get("format") != "cogvx_train.dit":
        raise ValueError(f"{directory / NATIVE_CONFIG} is not a cogvx_train DiT config (format={meta.get('format')!r})")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise ValueError(f"{directory / NATIVE_CONFIG} has fields this version does not know: {unknown}")
    cfg = DiTConfig(**meta["config"])
    return _load_state(cfg, load_file(directory / NATIVE_WEIGHTS, device=str(device)), dtype, directory)

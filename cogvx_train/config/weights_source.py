"""What a weights path holds, found cheaply before anything is built.

`init_from=`, `model.vae.weights=` and `cogvx-sample --checkpoint` name another run's weights. Pointed at the other
stage's checkpoint (a VAE where a transformer is expected), at a folder without weights or at a file that is not a
checkpoint, they used to end in a traceback once the model was built. These checks answer in one sentence first.
Single-file checkpoints are read memory-mapped (names only, no tensor data); the layout rules are the loaders' own
(`resolve_dit_checkpoint`, `resolve_vae_checkpoint`); sharded DeepSpeed / FSDP directories are left to their readers,
which check every shard while merging.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WHAT = {"dit": "transformer", "vae": "VAE"}
SOURCES = {
    "dit": "a dit run directory, its checkpoints/*.ckpt, or a diffusers CogVideoXTransformer3DModel / cogvx export "
           "directory",
    "vae": "a vae run directory, its checkpoints/*.ckpt, or a diffusers-format VAE directory (config.json + "
           "diffusion_pytorch_model.safetensors)",
}
DIFFUSERS_CLASSES = {"AutoencoderKLCogVideoX": "vae", "CogVideoXTransformer3DModel": "dit"}


def _resolve(path: Path, want: str) -> tuple[str, Path]:
    if want == "dit":
        from cogvx_train.dit.init_from import resolve_dit_checkpoint

        return resolve_dit_checkpoint(path)
    from cogvx_train.dit.frozen_encoders import resolve_vae_checkpoint

    return resolve_vae_checkpoint(path)


def _diffusers_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def stages_in_checkpoint(ckpt: Any) -> set[str]:
    """{'dit'} / {'vae'}: whose weights a loaded Lightning checkpoint holds, by the prefixes of its weight names."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    return {k.split(".", 1)[0] for k in state} & set(WHAT) if isinstance(state, dict) else set()


def check_weights_source(value: Any, label: str, want: str, sources: str | None = None) -> str | None:
    """One sentence when `value` cannot hold `want` ('dit' | 'vae') weights, else None. `label` names the input as
    the user wrote it (`init_from=/x`, `--checkpoint /x`); `sources` what it accepts (default: what the loaders
    read). A path that does not exist is reported elsewhere."""
    from cogvx_train.train import consolidate

    path, sources = Path(str(value)).expanduser(), sources or SOURCES[want]
    if not path.exists() or consolidate.is_deepspeed_checkpoint(path) or consolidate.fsdp_checkpoint_dir(path):
        return None
    try:
        kind, where = _resolve(path, want)
    except ValueError:
        return f"{label} holds no {WHAT[want]} weights cogvx-train can read; give {sources}."
    if kind == "diffusers":
        name = _diffusers_class(where)
        found = DIFFUSERS_CLASSES.get(name)
        if found is not None and found != want:
            return f"{label} is a diffusers {WHAT[found]} ({name}), not a {WHAT[want]}; give {sources}."
        return None
    if kind != "ckpt" or where.is_dir():
        return None
    try:
        found = stages_in_checkpoint(consolidate.load_pickle(where))
    except ValueError:
        why = ("one cut short while saving, or damaged" if consolidate.is_torch_archive(where)
               else "it is not a PyTorch checkpoint")
        return f"{label} cannot be read as a checkpoint: {why}; give {sources}."
    if want in found:
        return None
    if found:
        other = found.pop()
        kind = "run" if path.is_dir() else "checkpoint"
        return f"{label} is a {other}-stage {kind} ({WHAT[other]} weights), not a {want}-stage one; give {sources}."
    return f"{label} holds neither transformer ('dit.') nor VAE ('vae.') weights; give {sources}."

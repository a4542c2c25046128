"""init_from: start a DiT run from another run's weights, the step between training stages (B1 -> B2 -> B3 -> B4).

Sources: a dit run directory (its checkpoints/last.ckpt), a .ckpt file, a DeepSpeed ZeRO or FSDP sharded checkpoint
directory (the EMA when present; the shards are merged by cogvx_train.train.consolidate, without DeepSpeed and at any
world size), a cogvx export (transformer/dit_config.json) or a diffusers CogVideoXTransformer3DModel directory. Only
the transformer's weights are taken; optimizer, step and data start fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cogvx_train.train.ema import EMA

if TYPE_CHECKING:
    from cogvx_train.dit.module import DiTTrainingModule

log = logging.getLogger(__name__)


def resolve_dit_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("ckpt" | "diffusers" | "native", location) of a DiT weights path, or one sentence saying what would work."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return "ckpt", candidate
        for folder in (p, p / "transformer", p / "export" / "transformer"):
            if (folder / "dit_config.json").is_file():
                return "native", folder
            if (folder / "config.json").is_file():
                return "diffusers", folder
    elif p.is_file():
        return "ckpt", p
    raise ValueError(f"{str(p)!r} is not a dit run directory (checkpoints/last.ckpt), a .ckpt file or sharded "
                     "(DeepSpeed, FSDP) checkpoint directory, or a diffusers CogVideoXTransformer3DModel / cogvx "
                     "export directory.")


def dit_weights_from(path: str | Path, use_ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """Transformer weights (our parameter names) from any supported source, EMA preferred; plus a description."""
    from cogvx_train.dit import load_diffusers_transformer, load_dit

    from cogvx_train.train import consolidate

    if consolidate.is_deepspeed_checkpoint(Path(path)):  # a ZeRO directory: merge the shards, no DeepSpeed needed
        return weights_from_checkpoint(consolidate.load_full_training_state(path).lightning_checkpoint(), path, use_ema)
    fsdp = consolidate.fsdp_checkpoint_dir(path)
    if fsdp is not None:  # torch's distributed checkpoint (trainer=fsdp): read whole in this process
        return weights_from_checkpoint(consolidate.read_fsdp_checkpoint(fsdp).lightning_checkpoint(), fsdp, use_ema)
    kind, where = resolve_dit_checkpoint(path)
    if kind == "diffusers":
        return load_diffusers_transformer(where, dtype=torch.float32).state_dict(), f"diffusers {where}"
    if kind == "native":
        return load_dit(where, dtype=torch.float32).state_dict(), f"cogvx export {where}"
    return weights_from_checkpoint(torch.load(where, map_location="cpu", weights_only=False), where, use_ema)


def weights_from_checkpoint(ckpt: dict, where: str | Path, use_ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """The transformer weights of a loaded dit-stage Lightning checkpoint: its EMA when asked and present."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("dit.") for k in state):
        raise ValueError(f"{where} is not a dit-stage checkpoint (no 'dit.' weights); give a dit run directory, its "
                         "checkpoints/*.ckpt or a diffusers transformer directory.")
    weights = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    if use_ema and "dit_ema" in ckpt:
        weights.update(ckpt["dit_ema"]["shadow"])
        return weights, f"EMA of {where}"
    return weights, str(where)


def load_init_weights(module: DiTTrainingModule, path: str | Path) -> str:
    """Start a fresh run from another run's weights: a dit checkpoint / run directory (its EMA when present), a
    cogvx export, or a diffusers CogVideoXTransformer3DModel directory. Optimizer, step and data start fresh; the
    EMA restarts from the loaded weights. Position encodings hold no parameters (RoPE uses integer positions, the
    sincos table is recomputed for each token grid), so weights trained at one resolution load at any other."""
    weights, source = dit_weights_from(path, use_ema=True)
    own = module.dit.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {tuple(weights[wrong[0]].shape)} there and {tuple(own[wrong[0]].shape)} here")
        raise ValueError(f"init_from={path} holds a transformer of another architecture than this run's "
                         f"({detail}); use the same model size and text_fusion/attention variant.")
    module.dit.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)
    if module.ema is not None:
        module.ema = EMA(module.dit, module.ema.decay, module.ema.start_step)
    log.info("init_from: loaded transformer weights from %s", source)
    return source


"""One full training state from any checkpoint we write, read without the training engine.

A DeepSpeed ZeRO checkpoint is a directory (Lightning names it like a file, `last.ckpt/`):

    last.ckpt/latest                                          the tag of the newest save ("checkpoint")
    last.ckpt/checkpoint/mp_rank_00_model_states.pt           ZeRO-1/2: module weights, param_shapes, and the
                                                              Lightning state (loops, callbacks, EMA, schedulers)
    last.ckpt/checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's slice of the fp32 master weights
                                                              and of Adam's moments
    (ZeRO-3: zero_pp_rank_{r}_mp_rank_00_model_states.pt per rank; rank 0's carries the Lightning state)

How the slices fit together (what DeepSpeed's own zero_to_fp32.py relies on; this is an independent reader):

* ZeRO-1/2: each optimizer param group is one flat vector: its parameters flattened in `param_shapes` order (each
  followed by `param_alignment_paddings` zeros, if recorded), padded at the end so it splits evenly; rank r holds
  the r-th equal piece. The fp32 pieces are saved without that end padding; Adam's pieces (a torch AdamW state
  of the flat piece) with it, `group_paddings` saying how much. Concatenating the pieces in rank order and cutting
  at the parameter sizes gives every parameter.
* ZeRO-3: every parameter is split on its own into world_size equal pieces (the last one padded); rank r's flat
  vectors hold its piece of each parameter, one after another in `param_shapes` order. The EMA is sharded the same
  way (cogvx_train/train/ema.py): each rank's model-states file holds its pieces, merged here into whole tensors.

An FSDP checkpoint (`trainer=fsdp`, Lightning's "sharded" state dict) is a directory too: torch's distributed
checkpoint (`.metadata` plus one `__<rank>_0.distcp` file per rank) holding `model` (the LightningModule's state_dict
names) and `optimizer_0` (AdamW's state by parameter name), and `meta.pt`, the rest of the Lightning checkpoint
(loops, callbacks, schedulers, the EMA whole: the strategy gathers it before saving). torch reads the shards back
into whole tensors on its own (`dcp_to_torch_save`, no process group); nothing here depends on the world size.

The pickles also hold a few DeepSpeed objects (its loss scaler, an enum, slice addresses); they are read as inert
stand-ins, so nothing here imports DeepSpeed. `FullTrainingState.lightning_checkpoint()` turns the result into a
single-file Lightning checkpoint (weights + torch AdamW state + everything else) that DDP resumes from, and
`save_safetensors` writes the fp32 weights (and EMA) as one file. Plain Lightning `.ckpt` files read the same way.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# What DeepSpeed's engine adds to the checkpoint next to Lightning's own keys (DeepSpeed 0.1x). Everything else in
# the model-states file is the Lightning checkpoint that was handed to the engine as its "client state".
ENGINE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions", "ds_autoep_layers", "autoep_layers", "universal_checkpoint_info",
})
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_FILE_ZERO3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


# ------------------------------------------------------------------------------------------ reading pickles
class ForeignObject:
    """Stand-in for an object of a class we do not import (DeepSpeed's): keeps its constructor arguments and
    pickled fields, so values such as the ZeRO stage enum can still be read (`.args`, `.state`)."""

    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:
        return int(self.args[0])

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.args or self.state!r}>"


FOREIGN_PACKAGES = ("deepspeed",)
_foreign_classes: dict[tuple[str, str], type] = {}


def _foreign_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _foreign_classes:
        _foreign_classes[key] = type(name, (ForeignObject,), {"__module__": f"foreign.{module}"})
    return _foreign_classes[key]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in FOREIGN_PACKAGES:
            return _foreign_class(module, name)
        return super().find_class(module, name)


# torch.load takes a "pickle module": anything with Unpickler and load
_pickle_module = types.SimpleNamespace(Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
                                       __name__="cogvx_train.train.consolidate.pickle")


def is_torch_archive(path: str | Path) -> bool:
    """Whether the file starts like what torch.save writes (a zip archive), cut short or not."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def unreadable(path: str | Path, err: Exception) -> str:
    """Why a checkpoint file could not be loaded, and what to give instead, in one sentence."""
    if not is_torch_archive(path):
        return (f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one); give "
                "a run directory, a step-*.ckpt or last.ckpt a run wrote, or a DeepSpeed checkpoint directory.")
    return (f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is incomplete (cut short while "
            "saving, or damaged) — use an earlier step-*.ckpt of the same run.")


def load_pickle(path: str | Path) -> Any:
    """torch.load on the CPU, DeepSpeed classes replaced by stand-ins; one sentence if the file is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module, mmap=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, wrong format: see unreadable()
        raise ValueError(unreadable(path, err)) from err


# ----------------------------------------------------------------------------------------------- the result
@dataclass
class FullTrainingState:
    """Everything a checkpoint holds, unsharded, in fp32 where it is floating point."""

    weights: dict[str, Tensor]  # the LightningModule's state_dict names ("dit.blocks.0...")
    client_state: dict[str, Any]  # the Lightning checkpoint without state_dict / optimizer_states
    step: int = 0  # Adam's step counter (bias correction)
    moments: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # {"exp_avg": {name: t}, ...}; {} if none
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # hyper-parameters, "params": [names]
    world_size: int = 1  # ranks whose shards were merged (1 for single files)
    zero_stage: int | None = None  # the ZeRO stage of a DeepSpeed checkpoint
    source: str = ""

    def ema_weights(self) -> dict[str, Tensor]:
        """The EMA shadow weights under the state_dict names (`dit_ema` -> `dit.*`), {} when there is no EMA."""
        out: dict[str, Tensor] = {}
        for key, value in self.client_state.items():
            if key.endswith("_ema") and isinstance(value, dict) and isinstance(value.get("shadow"), dict):
                prefix = key[: -len("_ema")] + "."
                out.update({prefix + name: t.float() for name, t in value["shadow"].items()})
        return out

    def lightning_checkpoint(self) -> dict[str, Any]:
        """A single-file Lightning checkpoint: the client state plus `state_dict` and a torch AdamW state whose
        parameter indices follow the param groups, i.e. what `torch.save` of a DDP run would hold."""
        ckpt = dict(self.client_state)
        ckpt["state_dict"] = dict(self.weights)
        if self.param_groups:
            state, groups, index = {}, [], 0
            for group in self.param_groups:
                names = group["params"]
                for i, name in enumerate(names):
                    if self.moments:
                        state[index + i] = {"step": torch.tensor(float(self.step)),
                                            **{key: per_param[name] for key, per_param in self.moments.items()}}
                groups.append({**{k: v for k, v in group.items() if k != "params"},
                               "params": list(range(index, index + len(names))), "param_names": list(names)})
                index += len(names)
            ckpt["optimizer_states"] = [{"state": state, "param_groups": groups}]
        return ckpt


# ------------------------------------------------------------------------------------------ DeepSpeed layout
def deepspeed_tag_dir(path: str | Path) -> Path:
    """The folder with the *_states.pt files: `path` itself, `path/<latest tag>`, or a run's checkpoints/last.ckpt."""
    p = Path(path).expanduser()
    if (p / "checkpoints" / "last.ckpt").is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if (p / "latest").is_file():
        tagged = p / (p / "latest").read_text().strip()
        if tagged.is_dir():
            return tagged
    if p.is_dir() and any(p.glob("*_optim_states.pt")):
        return p
    raise ValueError(f"{p} is not a DeepSpeed checkpoint directory (no 'latest' file and no *_optim_states.pt); "
                     "give the directory Lightning wrote (e.g. checkpoints/last.ckpt) or its tag folder.")


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    try:
        deepspeed_tag_dir(path)
    except ValueError:
        return False
    return True


def _optim_files(tag_dir: Path) -> list[Path]:
    found = []
    for f in tag_dir.iterdir():
        m = OPTIM_FILE.match(f.name)
        if m:
            if int(m.group(2)) != 0:
                raise ValueError(f"{tag_dir} holds tensor/pipeline-parallel shards ({f.name}); only data-parallel "
                                 "ZeRO checkpoints (mp_rank_00) are supported.")
            found.append((int(m.group(1)), f))
    ranks = sorted(r for r, _ in found)
    if not found or ranks != list(range(len(ranks))):
        raise ValueError(f"{tag_dir} has optimizer shards for ranks {ranks}; a complete checkpoint has ranks "
                         f"0..N-1 — the save was interrupted, use an earlier checkpoint.")
    return [f for _, f in sorted(found)]


def deepspeed_world_size(path: str | Path) -> int:
    """Data-parallel world size that wrote a ZeRO checkpoint (the number of optimizer shards)."""
    return len(_optim_files(deepspeed_tag_dir(path)))


def _param_order(param_shapes: list[dict[str, Any]]) -> list[list[tuple[str, torch.Size]]]:
    return [[(name, torch.Size(shape)) for name, shape in group.items()] for group in param_shapes]


def _split_flat(flat: Tensor, params: list[tuple[str, torch.Size]], gaps: list[int] | None, world: int,
                what: str) -> dict[str, Tensor]:
    """Cut a group's concatenated flat vector into its parameters (ZeRO-1/2 layout). What is left after the last
    parameter can only be alignment padding: fewer values than the 2 x world_size DeepSpeed aligns groups to."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(params):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise ValueError(f"{what}: the shards hold {flat.numel()} values but the parameters need more (at "
                             f"{name}); the checkpoint is incomplete or from another model.")
        out[name] = flat.narrow(0, offset, n).view(shape).float().clone()
        offset += n + (gaps[i] if gaps else 0)
    if not 0 <= flat.numel() - offset < 2 * world:
        raise ValueError(f"{what}: {flat.numel() - offset} values left over after the last parameter; the "
                         "checkpoint does not match its own parameter list.")
    return out


def _zero12(tag_dir: Path, shards: list[dict], model_state: dict) -> tuple[dict, dict, int, list]:
    """Weights, moments, step and param-group hyper-parameters of a ZeRO-1/2 checkpoint."""
    groups = _param_order(model_state["param_shapes"])
    first = shards[0]
    gaps_per_group = first.get("param_alignment_paddings")
    weights: dict[str, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {k: {} for k in MOMENT_KEYS}
    step, param_groups = 0, []
    base0 = first["base_optimizer_state"]
    rigid = isinstance(base0, dict)  # DeepSpeed's default; "elastic" checkpoints store a list of lean states
    for g, params in enumerate(groups):
        gaps = gaps_per_group[g] if gaps_per_group else None
        flat = torch.cat([s["single_partition_of_fp32_groups"][g] for s in shards])
        weights.update(_split_flat(flat, params, gaps, len(shards), f"{tag_dir} group {g} weights"))
        for key in MOMENT_KEYS:
            pieces = []
            for s in shards:
                base = s["base_optimizer_state"]
                state = base["state"].get(g, {}) if rigid else base[g]
                if key not in state:
                    break
                piece = state[key]
                pad = s["group_paddings"][g] if rigid else 0  # rigid pieces keep the end padding
                pieces.append(piece[: piece.numel() - pad])
            else:
                flat_moment = torch.cat(pieces)
                moments[key].update(_split_flat(flat_moment, params, gaps, len(shards), f"{tag_dir} group {g} {key}"))
        if rigid:
            hyper = dict(base0["param_groups"][g])
            state = base0["state"].get(g, {})
            step = int(state["step"]) if "step" in state else step
        else:
            hyper = {}
            step = int(first.get("base_optimizer_state_step", step))
        hyper["params"] = [name for name, _ in params]
        param_groups.append(hyper)
    if not all(moments[k] for k in MOMENT_KEYS):
        moments = {}  # before the first optimizer step Adam has no state yet
    return weights, moments, step, param_groups


def _zero3(tag_dir: Path, shards: list[dict], model_state: dict) -> tuple[dict, dict, int, list]:
    """Weights, moments and step of a ZeRO-3 checkpoint (each parameter split over the ranks on its own)."""
    world = len(shards)
    params = [p for group in _param_order(model_state["param_shapes"]) for p in group]

    def gather(vectors_per_rank: list[Tensor], what: str) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape in params:
            piece = partition_size(math.prod(shape), world)
            if offset + piece > vectors_per_rank[0].numel():
                raise ValueError(f"{what}: the shards are shorter than the parameters need (at {name}).")
            out[name] = merge_slices([v.narrow(0, offset, piece) for v in vectors_per_rank], shape)
            offset += piece
        return out

    flats = [torch.cat([t.flatten() for t in s["fp32_flat_groups"]]) for s in shards]
    weights = gather(flats, f"{tag_dir} weights")
    moments: dict[str, dict[str, Tensor]] = {}
    step = 0
    base = [s.get("optimizer_state_dict", {}) for s in shards]
    if all(b.get("state") for b in base):
        for key in MOMENT_KEYS:
            per_rank = [torch.cat([b["state"][i][key].flatten() for i in sorted(b["state"])]) for b in base]
            moments[key] = gather(per_rank, f"{tag_dir} {key}")
        first_state = base[0]["state"][min(base[0]["state"])]
        step = int(first_state.get("step", 0))
    hyper = base[0].get("param_groups", [])
    groups = _param_order(model_state["param_shapes"])
    param_groups = []
    if len(hyper) == len(groups):  # else sub_group_size split the user's groups: their hyper-parameters are lost
        param_groups = [{**{k: v for k, v in h.items() if k != "params"}, "params": [name for name, _ in g]}
                        for h, g in zip(hyper, groups)]
    return weights, moments, step, param_groups


def read_deepspeed_checkpoint(path: str | Path) -> FullTrainingState:
    """The full fp32 training state of a ZeRO-1/2/3 checkpoint directory, without DeepSpeed."""
    tag_dir = deepspeed_tag_dir(path)
    optim_files = _optim_files(tag_dir)
    shards = [load_pickle(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(shards[0]["zero_stage"])
    counts = shards[0]["partition_count"]
    saved_world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if saved_world != len(shards):
        raise ValueError(f"{tag_dir} was written by {saved_world} ranks but holds {len(shards)} optimizer shards; "
                         "the save was interrupted — use an earlier checkpoint.")
    model_file = tag_dir / ("mp_rank_00_model_states.pt" if stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if not model_file.is_file():
        raise ValueError(f"{tag_dir} has no {model_file.name}; the checkpoint is incomplete.")
    model_state = load_pickle(model_file)
    if stage <= 2:
        weights, moments, step, groups = _zero12(tag_dir, shards, model_state)
    else:
        weights, moments, step, groups = _zero3(tag_dir, shards, model_state)
    buffers = set(model_state.get("buffer_names") or [])
    for name, value in (model_state.get("module") or {}).items():
        if name in buffers:
            weights[name] = value.float() if value.is_floating_point() else value
    for name, value in (model_state.get("frozen_param_fragments") or {}).items():
        if stage <= 2:  # ZeRO-3 frozen parameters are sharded too; they are not trained, so not needed here
            weights[name] = value.float()
    for alias, target in (model_state.get("shared_params") or {}).items():
        if target in weights:
            weights[alias] = weights[target]
    client = {k: v for k, v in model_state.items() if k not in ENGINE_KEYS}
    if stage == 3:
        _merge_sliced_emas(tag_dir, client, len(shards))
    return FullTrainingState(weights=weights, client_state=client, step=step, moments=moments, param_groups=groups,
                             world_size=len(shards), zero_stage=stage, source=str(tag_dir))


def partition_size(numel: int, world_size: int) -> int:
    """Values per rank of a ZeRO-3 parameter of `numel` values: ceil(numel / world_size)."""
    return -(-numel // world_size)


def slice_of(whole: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s flat ZeRO-3 piece of a whole tensor, zero-padded to the piece size (a copy)."""
    flat = whole.reshape(-1)
    size = partition_size(flat.numel(), world_size)
    out = flat.new_zeros(size)
    piece = flat[rank * size:(rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def merge_slices(pieces: list[Tensor], shape) -> Tensor:
    """The whole fp32 tensor of `shape` from the ranks' ZeRO-3 pieces, in rank order (inverse of `slice_of`)."""
    n = math.prod(shape)
    return torch.cat([piece.reshape(-1) for piece in pieces])[:n].view(tuple(shape)).float().clone()


def _merge_sliced_emas(tag_dir: Path, client: dict[str, Any], world: int) -> None:
    """Replace each sharded EMA state in `client` (rank 0's) with one holding whole tensors, merged from every
    rank's model-states file (an EMA under ZeRO-3 keeps its slices there with `partition` = rank, world size and
    whole shapes; see cogvx_train/train/ema.py)."""
    keys = [k for k, v in client.items() if k.endswith("_ema") and isinstance(v, dict) and "partition" in v]
    if not keys:
        return
    files = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(1, world)]
    states = [client] + [load_pickle(f) if f.is_file() else {} for f in files]
    for key in keys:
        parts = [state.get(key) if isinstance(state.get(key), dict) else {} for state in states]
        for rank, part in enumerate(parts):
            where = part.get("partition") or {}
            if (where.get("rank"), where.get("world_size")) != (rank, world):
                raise ValueError(f"{tag_dir}: rank {rank}'s model states hold no {key} slices of {world} ranks; the "
                                 "checkpoint is incomplete — use an earlier checkpoint.")
        shapes = parts[0]["partition"]["shapes"]
        shadow = {name: merge_slices([part["shadow"][name] for part in parts], shapes[name]) if name in shapes
                  else t for name, t in parts[0]["shadow"].items()}
        client[key] = {**{k: v for k, v in parts[0].items() if k not in ("shadow", "partition")}, "shadow": shadow}


# ---------------------------------------------------------------------------------------- FSDP (torch DCP)
FSDP_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def fsdp_checkpoint_dir(path: str | Path) -> Path | None:
    """The FSDP checkpoint directory `path` is (or a run directory's checkpoints/last.ckpt), else None."""
    p = Path(path).expanduser()
    for candidate in (p, p / "checkpoints" / "last.ckpt"):
        if (candidate / ".metadata").is_file() and (candidate / "meta.pt").is_file():
            return candidate
    return None


def read_fsdp_checkpoint(path: str | Path) -> FullTrainingState:
    """The full fp32 training state of an FSDP sharded checkpoint directory, on the CPU, in one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = fsdp_checkpoint_dir(path)
    if folder is None:
        raise ValueError(f"{path} is not an FSDP checkpoint directory (no .metadata and meta.pt); give the "
                         "directory Lightning wrote (e.g. checkpoints/last.ckpt).")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dcp_to_torch_save(folder, Path(tmp) / "full.pt")
        except Exception as err:  # noqa: BLE001 - a missing or truncated shard: one answer for the user
            raise ValueError(f"{folder} cannot be read ({type(err).__name__}: {err}); the checkpoint is incomplete "
                             "— use an earlier step-*.ckpt of the same run.") from err
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in full["model"].items()}
    optim = full.get("optimizer_0") or {"state": {}, "param_groups": []}
    state = optim["state"]
    moments: dict[str, dict[str, Tensor]] = {}
    step = 0
    if state and all(all(k in s for k in MOMENT_KEYS) for s in state.values()):
        moments = {k: {name: s[k].float() for name, s in state.items()} for k in MOMENT_KEYS}
        step = int(next(iter(state.values()))["step"])
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optim["param_groups"]]
    ranks = {int(m.group(1)) for f in folder.iterdir() if (m := FSDP_SHARD_FILE.match(f.name))}
    return FullTrainingState(weights=weights, client_state=load_pickle(folder / "meta.pt"), step=step,
                             moments=moments, param_groups=groups, world_size=len(ranks), source=str(folder))


# ----------------------------------------------------------------------------------- plain Lightning files
def read_lightning_checkpoint(path: str | Path) -> FullTrainingState:
    """The same view of a single-file Lightning checkpoint (DDP runs, or one written by `lightning_checkpoint`)."""
    ckpt = load_pickle(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by training.")
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    client = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
    moments: dict[str, dict[str, Tensor]] = {}
    groups: list[dict[str, Any]] = []
    step = 0
    optim = ckpt.get("optimizer_states") or []
    if len(optim) == 1 and all("param_names" in g for g in optim[0]["param_groups"]):
        # files written by FullTrainingState.lightning_checkpoint name their parameters; a DDP run's do not, and
        # a DDP run resumes from its own file anyway, so only the weights are needed from those
        by_index = {}
        for group in optim[0]["param_groups"]:
            groups.append({**{k: v for k, v in group.items() if k not in ("params", "param_names")},
                           "params": list(group["param_names"])})
            by_index.update(zip(group["params"], group["param_names"]))
        state = optim[0]["state"]
        if state and all(all(k in s for k in MOMENT_KEYS) for s in state.values()):
            moments = {k: {by_index[i]: s[k].float() for i, s in state.items()} for k in MOMENT_KEYS}
            step = int(next(iter(state.values()))["step"])
    return FullTrainingState(weights=weights, client_state=client, step=step, moments=moments, param_groups=groups,
                             world_size=1, source=str(path))


def load_full_training_state(path: str | Path) -> FullTrainingState:
    """Any checkpoint we write: a DeepSpeed or FSDP directory, a run directory, or a single-file .ckpt."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"checkpoint {p} does not exist; give a run directory, checkpoints/last.ckpt or a .ckpt.")
    if p.is_dir():
        if is_deepspeed_checkpoint(p):
            return read_deepspeed_checkpoint(p)
        if fsdp_checkpoint_dir(p) is not None:
            return read_fsdp_checkpoint(p)
        if (p / "checkpoints" / "last.ckpt").is_file():
            return read_lightning_checkpoint(p / "checkpoints" / "last.ckpt")
        raise ValueError(f"{p} is neither a DeepSpeed checkpoint directory nor a run directory with "
                         "checkpoints/last.ckpt, nor an FSDP checkpoint directory (.metadata and meta.pt).")
    return read_lightning_checkpoint(p)


# ---------------------------------------------------------------------------------------------- safetensors
def weights_for_export(state: FullTrainingState, ema: bool = False) -> tuple[dict[str, Tensor], str]:
    """(tensors, description). Default: the live weights, plus `ema.<name>` for every EMA weight when the run has
    an EMA. `ema=True`: the EMA weights under the plain names (a drop-in file for sampling)."""
    averaged = state.ema_weights()
    if ema:
        if not averaged:
            raise ValueError(f"{state.source} has no EMA weights; convert without --ema to get the live weights.")
        tensors = dict(state.weights)
        tensors.update(averaged)
        return tensors, "ema"
    tensors = dict(state.weights)
    tensors.update({f"ema.{name}": t for name, t in averaged.items()})
    return tensors, "live+ema" if averaged else "live"


def save_safetensors(state: FullTrainingState, out: str | Path, ema: bool = False) -> Path:
    """One .safetensors file (fp32, contiguous, shared tensors copied) plus `<out>.json` with the run's
    hyper-parameters and step. Returns the .safetensors path."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    tensors, kind = weights_for_export(state, ema)
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in tensors.items()}
    meta = describe(state, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "cogvx": json.dumps(meta, default=str)})
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return out


def describe(state: FullTrainingState, kind: str) -> dict[str, Any]:
    """What the converted weights are: source, step, world size, and the module's own config."""
    client = state.client_state
    return {
        "source": state.source,
        "weights": kind,
        "global_step": client.get("global_step"),
        "epoch": client.get("epoch"),
        "world_size": state.world_size,
        "zero_stage": state.zero_stage,
        "hyper_parameters": client.get("hyper_parameters"),
        **{k: v for k, v in client.items() if k.startswith("cogvx")},
    }

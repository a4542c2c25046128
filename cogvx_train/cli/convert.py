"""`cogvx-convert`: any checkpoint a run writes -> one file, without DeepSpeed or a GPU.

    python -m cogvx_train.cli.convert <run dir | last.ckpt/ (DeepSpeed) | step-*.ckpt> --out model.safetensors
    python -m cogvx_train.cli.convert <checkpoint> --out model.safetensors --ema     EMA weights, plain names
    python -m cogvx_train.cli.convert <DeepSpeed dir> --out full.ckpt                 single-file training state

`.safetensors`: the fp32 weights under the LightningModule's names (`dit.*`, `vae.*`), plus `ema.<name>` for each EMA
weight when the run keeps an EMA; with --ema, the EMA weights alone under the plain names. Next to it,
`<out>.json` records the source, step, world size and the run's hyper-parameters.

`.ckpt`: the whole training state of a sharded DeepSpeed checkpoint as one Lightning checkpoint (weights, AdamW
moments and step by parameter name, loops, data position, EMA, schedulers), e.g. to archive it or to resume it
with a different number of ranks (`resume=<run>/checkpoints/<file>.ckpt`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "cogvx-convert"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoint", help="a run directory, a DeepSpeed checkpoint directory or a .ckpt file")
    parser.add_argument("--out", required=True, help="output file: .safetensors (weights) or .ckpt (training state)")
    parser.add_argument("--ema", action="store_true", help="write the EMA weights under the plain names")
    return parser.parse_args(argv)


def convert(checkpoint: str, out: str, ema: bool = False) -> str:
    """Do the conversion; returns a one-line summary. Raises ValueError with one sentence on bad input."""
    from cogvx_train.train.consolidate import load_full_training_state, save_safetensors

    target = Path(out).expanduser()
    if target.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"--out {out} must end in .safetensors (weights) or .ckpt (whole training state).")
    if target.suffix == ".ckpt" and ema:
        raise ValueError("--ema only applies to .safetensors output; a .ckpt keeps both live and EMA weights.")
    state = load_full_training_state(checkpoint)
    if target.suffix == ".safetensors":
        written = save_safetensors(state, target, ema=ema)
        what = "EMA weights" if ema else "weights" + (" + EMA" if state.ema_weights() else "")
    else:
        from cogvx_train.train.checkpointing import atomic_torch_save

        atomic_torch_save(state.lightning_checkpoint(), target)
        written = target
        what = "training state" + (" with optimizer moments" if state.moments else " (no optimizer moments)")
    params = sum(t.numel() for t in state.weights.values())
    shards = f" ({state.world_size} ZeRO shards)" if state.zero_stage else ""
    return (f"wrote {written}: {what}, {len(state.weights)} tensors, {params:,} values, step "
            f"{state.client_state.get('global_step')}, from {state.source}{shards}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, ema=args.ema))
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

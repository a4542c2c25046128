"""`cogvx-sample`: videos from a DiT checkpoint and prompts, through the same code validation uses.

    cogvx-sample --checkpoint outputs/runs/dit_b1/<run> --prompt "a red circle moves" --out samples/
    cogvx-sample --checkpoint run/checkpoints/step-00001000.ckpt --prompts-file prompts.txt --steps 50 \
        --guidance-scale 6 --guidance-schedule dynamic_cosine --seed 1234 --num-frames 49 --height 480 --width 720

The checkpoint's hyper-parameters name the frozen VAE and text encoder and the noise schedule; its EMA weights are
used unless --no-ema. Prompt i is written to OUT/{i:02d}_{prompt words}.mp4 and depends only on the weights, the
seed, i and the settings. Defaults for steps, guidance and seed come from the run's `sampling` config; frames and
size from the data the run trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="dit run directory or .ckpt file")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--out", type=Path, required=True, help="folder for the mp4s")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the run's sampling.num_steps)")
    parser.add_argument("--guidance-scale", type=float, help="CFG scale (1 = off; default: the run's)")
    parser.add_argument("--guidance-schedule", choices=("constant", "dynamic_cosine"))
    parser.add_argument("--seed", type=int, help="noise seed (default: the run's sampling.seed)")
    parser.add_argument("--num-frames", type=int, help="4k+1 frames (default: the training data's)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: the training data's)")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: the training data's)")
    parser.add_argument("--fps", type=float, help="frame rate written into the mp4s (default: the run's)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=True,
                     help="sample with the EMA weights when the checkpoint has them (default)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="sample with the live weights")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="run the transformer under bf16 autocast (CUDA)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts denoised together")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The settings a user typed, checked before the checkpoint is loaded (seconds to minutes for a large model)."""
    import torch

    from cogvx_train.config.validate import check_num_frames
    from cogvx_train.config.weights_source import check_weights_source

    sources = "a dit run directory or one of its checkpoints/*.ckpt"  # they record the VAE, T5 and schedule too
    if not args.checkpoint.exists():
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist; give {sources}.")
    label = f"--checkpoint {args.checkpoint}"
    if (problem := check_weights_source(args.checkpoint, label, "dit", sources)) is not None:
        raise ValueError(problem)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the mp4s (it is created when missing).")
    if args.num_frames is not None and (problem := check_num_frames(args.num_frames, "--num-frames")) is not None:
        raise ValueError(problem)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 16 or value % 16):
            raise ValueError(f"{flag} {value} must be a positive multiple of 16 (8x VAE downsampling times the 2x2 "
                             f"patches), e.g. {max(16, round(value / 16) * 16)}.")
    for flag, value, hint in (("--steps", args.steps, " (50 is the released setting)"),
                              ("--batch-size", args.batch_size, "")):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1{hint}.")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps {args.fps} must be a frame rate > 0, e.g. 8.")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise ValueError(f"--guidance-scale {args.guidance_scale} must be >= 0 (1 = no guidance, 6 is the released "
                         "value).")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device} is not a torch device; use cuda, cuda:N or cpu.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} asks for CUDA, which this machine does not have; use --device "
                             "cpu.")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            state = "is a folder" if args.prompts_file.is_dir() else "does not exist"
            raise ValueError(f"--prompts-file {args.prompts_file} {state}; give a text file with one prompt per line.")
        prompts += [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError("no prompt given; add --prompt \"...\" (repeatable) or --prompts-file FILE.")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from cogvx_train.sampling import load_for_sampling
    from cogvx_train.sampling import sample_videos

    prompts = read_prompts(args)
    check_args(args)  # before loading: 0 steps / 0 fps are refused here, so `or` below only fills unset options
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, source = load_for_sampling(args.checkpoint, use_ema=args.use_ema, device=device)
    s = module.sampling_cfg
    frames, height, width = module.sample_shape()
    settings = {
        "num_frames": args.num_frames or frames, "height": args.height or height, "width": args.width or width,
        "num_steps": args.steps or s.num_steps,
        "guidance_scale": s.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        "guidance_schedule": args.guidance_schedule or s.guidance_schedule,
        "seed": s.seed if args.seed is None else args.seed, "fps": args.fps or s.fps,
    }
    print(f"cogvx-sample: {len(prompts)} prompt(s) with {source}; {json.dumps(settings)}", flush=True)
    encoders = module.encoders(vae=True, text=True)
    with torch.no_grad():
        result = sample_videos(module.dit, encoders.vae, module.schedule, prompts, text_encoder=encoders.text_encoder,
                               scaling_factor=module.scaling_factor, batch_size=args.batch_size,
                               autocast_dtype=torch.bfloat16 if args.bf16 else None, out_dir=args.out,
                               name_format="{i:02d}_{slug}.mp4", progress=sys.stderr.isatty(), **settings)
    manifest = [{"prompt": p, "file": path.name} for p, path in zip(prompts, result.paths)]
    (args.out / "samples.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "weights": source,
                                                       "settings": settings, "samples": manifest}, indent=2) + "\n")
    for path in result.paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:  # ConfigError is a ValueError too: one line, exit code 2
        print(f"cogvx-sample: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Validation / inference sampling: ours (cogvx_train.sampling.sample_videos) vs diffusers' CogVideoXPipeline.

The same tiny DiT and VAE (ours, random weights, exported to CogVideoXTransformer3DModel and
AutoencoderKLCogVideoX for the pipeline), the same text embeddings (negative = zeros, our unconditional branch),
the same initial noise, DDIM with v-prediction, trailing spacing and constant CFG, decoded to video. The outputs
are checked to match first (latents and video, max abs diff <= 1e-4, as tests/dit_training/test_pipeline_parity.py
does), then both run in interleaved reps; reported: the median over reps of the per-rep ratio of process CPU time
(ours / diffusers) and the wall-clock medians, for the whole call and for latents only (no decode).

    python scripts/bench_sampling.py [--reps 7] [--threads 1] [--steps 10]

The last line prints the ratios (goal, performance.md G6: <= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

FRAMES, HEIGHT, WIDTH, SCALE, SNR_SHIFT, TEXT = 9, 64, 64, 6.0, 3.0, 8


def build(tmp: Path):
    """Our tiny DiT + VAE with every weight random (adaLN-zero would make the DiT the identity), and the pipeline
    assembled from what `export_pipeline` (the end-of-training export) writes for them."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    from cogvx_train.dit import build_dit
    from cogvx_train.dit.pipeline_export import export_pipeline
    from cogvx_train.dit.training_config import DiffusionConfig
    from cogvx_train.vae import build_vae

    torch.manual_seed(0)
    dit = build_dit("tiny", positions="rope3d", sample_height=HEIGHT // 8, sample_width=WIDTH // 8,
                    sample_frames=(FRAMES - 1) // 4 + 1, max_text_tokens=TEXT).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dit.parameters():  # gains around 1 (LayerNorm, q/k norm), everything else small
            gain = p.ndim == 1 and torch.all(p == 1)
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if gain else 0.05) + (1.0 if gain else 0.0))
    vae = build_vae("tiny", scaling_factor=0.7).eval()
    out = export_pipeline(dit, vae, DiffusionConfig(snr_shift=SNR_SHIFT), tmp / "pipeline")
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None,
                             vae=AutoencoderKLCogVideoX.from_pretrained(out / "vae").eval(),
                             transformer=CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval(),
                             scheduler=CogVideoXDDIMScheduler.from_pretrained(out / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return dit, vae, pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)  # two OpenMP threads stall on a busy 2-core box
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--count", type=int, default=2, help="prompts per call (one batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cogvx_train.diffusion import NoiseSchedule
    from cogvx_train.sampling import initial_noise, sample_videos

    with tempfile.TemporaryDirectory() as tmp:
        dit, vae, pipe = build(Path(tmp))
    cond = torch.randn(args.count, TEXT, dit.config.text_embed_dim, generator=torch.Generator().manual_seed(3))
    shape = (16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    noise = torch.stack([initial_noise(11, i, shape) for i in range(args.count)])
    schedule = NoiseSchedule(snr_shift=SNR_SHIFT)

    def ours(decode: bool):
        out = sample_videos(dit, vae, schedule, text_embeds=cond, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                            num_steps=args.steps, guidance_scale=SCALE, seed=11, batch_size=args.count,
                            decode=decode)
        return out.videos if decode else out.latents

    def diffusers(decode: bool):
        with torch.no_grad():
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                       latents=noise.permute(0, 2, 1, 3, 4), height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                       num_inference_steps=args.steps, guidance_scale=SCALE,
                       output_type="pt" if decode else "latent").frames
        return out.permute(0, 2, 1, 3, 4)  # [B, T, C, H, W] -> [B, C, T, H, W]

    latent_diff = (ours(False) - diffusers(False)).abs().max().item()
    video_diff = ((ours(True) / 2 + 0.5).clamp(0, 1) - diffusers(True)).abs().max().item()  # diffusers: [0, 1]
    print(f"{args.count} videos {FRAMES}x{HEIGHT}x{WIDTH}, {args.steps} DDIM steps, CFG {SCALE}: max|diff| latents "
          f"{latent_diff:.1e}, video {video_diff:.1e}")
    if latent_diff > 1e-4 or video_diff > 1e-4:
        raise SystemExit("outputs differ: timing would compare different computations")

    ratios = {}
    for decode in (False, True):
        runs = {"ours": lambda: ours(decode), "diffusers": lambda: diffusers(decode)}
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in runs}
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                runs[name]()
                times[name].append((time.process_time() - c0, time.perf_counter() - t0))
        per_rep = [a[0] / b[0] for a, b in zip(times["ours"], times["diffusers"])]
        what = "with decode" if decode else "latents only"
        med = {n: (statistics.median(t[0] for t in v) * 1e3, statistics.median(t[1] for t in v) * 1e3)
               for n, v in times.items()}
        ratios[what] = statistics.median(per_rep)
        print(f"[{what}] ms (process CPU / wall): ours {med['ours'][0]:.1f} / {med['ours'][1]:.1f}, diffusers "
              f"{med['diffusers'][0]:.1f} / {med['diffusers'][1]:.1f}; CPU-time median ratio {ratios[what]:.3f} "
              f"(per-rep {', '.join(f'{r:.2f}' for r in per_rep)})")
    print("ratios ours/diffusers pipeline (process CPU time, interleaved medians): "
          + "  ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()

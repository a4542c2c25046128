"""One DiT training step (forward, backward, AdamW): ours vs diffusers' CogVideoXTransformer3DModel, same process.

Same config, same weights, same inputs. Outputs are checked to match first (fp32 max abs diff <= 1e-5), and the
analytic FLOP count against torch's FlopCounterMode (within 2%). Then 3 warm-ups each and interleaved A/B reps;
reported: median step-time ratio (ours / diffusers; wall clock, plus process CPU time and the ratio of the fastest
reps, which a machine shared with other jobs disturbs less) and saved-activation bytes ratio (unique storages saved for backward during forward,
parameters excluded).

    python scripts/bench_dit.py [--reps 9] [--threads 2] [--configs tiny,2k]

The last line prints the ratios (goals: time <= 0.90, activation bytes <= 0.90).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cogvx_train.dit import build_dit, flop_counter_mapping, flops_per_step, rope3d_frequencies
from cogvx_train.dit.diffusers_format import config_to_diffusers, to_diffusers_key

# name -> (model overrides, batch, latent frames, latent height, latent width, text tokens)
CONFIGS = {
    "tiny": (dict(num_layers=2), 2, 13, 8, 12, 16),  # 312 vision + 16 text tokens
    "2k": (dict(num_layers=2), 1, 13, 24, 26, 16),  # 2028 vision + 16 text tokens
}


def build_pair(overrides: dict, text_tokens: int, seed: int = 0):
    """Our tiny model with random (non-zero) weights and diffusers' model holding the same weights."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    ours = build_dit("tiny", positions="rope3d", max_text_tokens=text_tokens, **overrides)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    config = {k: v for k, v in config_to_diffusers(ours.config).items() if not k.startswith("_")}
    ref = CogVideoXTransformer3DModel(**config)
    ref.load_state_dict({to_diffusers_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    return ours, ref


class Runner:
    """Calls a model on channel-first inputs and trains it with AdamW."""

    def __init__(self, model, is_ref: bool, inputs):
        self.model, self.is_ref, self.inputs = model, is_ref, inputs
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward(self):
        latents, t, text, rope, _ = self.inputs
        if self.is_ref:
            out = self.model(latents.transpose(1, 2), text, t, image_rotary_emb=rope, return_dict=False)[0]
            return out.transpose(1, 2)
        return self.model(latents, t, text)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.forward(), self.inputs[4])
        loss.backward()
        self.opt.step()
        return loss.item()


def saved_activation_bytes(runner: Runner) -> int:
    """Bytes of the unique storages autograd saves during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = runner.forward()
    del out
    return sum(storages.values())


def bench(name: str, reps: int) -> tuple[float, float]:
    overrides, batch, frames, height, width, text_tokens = CONFIGS[name]
    ours, ref = build_pair(overrides, text_tokens)
    cfg = ours.config
    torch.manual_seed(1)
    latents = torch.randn(batch, cfg.in_channels, frames, height, width)
    inputs = (latents, torch.randint(0, 1000, (batch,)), torch.randn(batch, text_tokens, cfg.text_embed_dim),
              rope3d_frequencies(frames, height // 2, width // 2, cfg.head_dim), torch.randn_like(latents))
    a, b = Runner(ours, False, inputs), Runner(ref, True, inputs)

    with torch.no_grad():
        diff = (a.forward() - b.forward()).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"{name}: outputs differ by {diff:.2e} > 1e-5; timings would compare different models")

    with FlopCounterMode(display=False, custom_mapping=flop_counter_mapping()) as counter:
        a.forward().square().mean().backward()
    counted = counter.get_total_flops()
    analytic = flops_per_step(cfg, batch, frames, height, width, text_tokens, mode="hardware")
    if abs(counted / analytic - 1) > 0.02:
        raise SystemExit(f"{name}: analytic FLOPs {analytic:.4g} vs FlopCounterMode {counted:.4g} (> 2% apart)")
    model_flops = flops_per_step(cfg, batch, frames, height, width, text_tokens, mode="model")

    bytes_a, bytes_b = saved_activation_bytes(a), saved_activation_bytes(b)
    ours.gradient_checkpointing = True
    bytes_gc = saved_activation_bytes(a)
    ours.gradient_checkpointing = False
    tokens = frames * (height // 2) * (width // 2) + text_tokens
    boundary = cfg.num_layers * batch * tokens * cfg.hidden_size * 4  # the block inputs, fp32
    loss_a, loss_b = a.step(), b.step()  # first step from identical weights
    for _ in range(2):
        a.step(), b.step()
    times_a, times_b, ratios, cpu_ratios = [], [], [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        a.step()
        t1, c1 = time.perf_counter(), time.process_time()
        b.step()
        t2, c2 = time.perf_counter(), time.process_time()
        times_a.append(t1 - t0), times_b.append(t2 - t1), ratios.append((t1 - t0) / (t2 - t1))
        cpu_ratios.append((c1 - c0) / (c2 - c1))
    print(f"[{name}] B={batch} tokens={tokens} layers={cfg.num_layers} hidden={cfg.hidden_size}: "
          f"max|out diff|={diff:.1e}, loss {loss_a:.6f} vs {loss_b:.6f}")
    print(f"[{name}] FLOPs/step: analytic hardware {analytic:.4g} == FlopCounterMode {counted:.4g} "
          f"({100 * (counted / analytic - 1):+.2f}%), model {model_flops:.4g}")
    print(f"[{name}] step time median: ours {1e3 * statistics.median(times_a):.1f} ms, diffusers "
          f"{1e3 * statistics.median(times_b):.1f} ms, median ratio {statistics.median(ratios):.3f} "
          f"(per-rep {', '.join(f'{r:.2f}' for r in ratios)}); CPU-time median ratio "
          f"{statistics.median(cpu_ratios):.3f}; ratio of the fastest reps {min(times_a) / min(times_b):.3f}")
    print(f"[{name}] saved activations: ours {bytes_a / 2**20:.2f} MiB, diffusers {bytes_b / 2**20:.2f} MiB, "
          f"ratio {bytes_a / bytes_b:.3f}; ours with gradient checkpointing {bytes_gc / 2**20:.2f} MiB = "
          f"{bytes_gc / boundary:.2f}x the per-layer block inputs (L*T*d*4 bytes)")
    return statistics.median(ratios), statistics.median(cpu_ratios), bytes_a / bytes_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="tiny,2k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    results = {name: bench(name, args.reps) for name in names}
    print("ratios ours/diffusers: " + "  ".join(f"{n}: time {t:.3f} (cpu {c:.3f}) act_bytes {m:.3f}"
                                                for n, (t, c, m) in results.items()))


if __name__ == "__main__":
    main()

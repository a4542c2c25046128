"""One DiT training step (forward, backward, AdamW): ours vs diffusers' CogVideoXTransformer3DModel, same process.

Same config, same weights, same inputs; each trained with its optimizer as shipped: ours with the AdamW cogvx-train
builds (cogvx_train.train.optimizer.adamw: torch's fused kernel), diffusers' with torch's default AdamW, which its
training examples use. Outputs are checked to match first (fp32 max abs diff <= 1e-5), and the
analytic FLOP count against torch's FlopCounterMode (within 2%). Then warm-ups and interleaved reps (the order of
the models rotates every rep); reported: the median over reps of the per-rep ratio of process CPU time (ours /
diffusers; a machine shared with other jobs disturbs it less than wall clock, which is printed too) and the
saved-activation bytes ratio (unique storages saved for backward during forward, parameters excluded).

--compile adds both models with every transformer block torch.compile'd the same way (ours: `compile: true` in
the DiT config, i.e. ExpertTransformer.compile_blocks; diffusers: nn.Module.compile on each of its blocks) and
reports the like-for-like compiled ratio and ours compiled / diffusers eager. --profile prints where the eager
step's time goes (forward, backward, optimizer; SDPA and GEMM kernels; everything else) and the best ratio
reachable if everything but SDPA, GEMMs and AdamW were free.

    python scripts/bench_dit.py [--reps 15] [--threads 1] [--configs tiny,2k] [--compile] [--profile]

The last line prints the ratios (goals: time <= 0.90, activation bytes <= 0.90).
"""

from __future__ import annotations

import argparse
import collections
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


def build_pair(overrides: dict, text_tokens: int, seed: int = 0, compile_blocks: bool = False):
    """Our tiny model with random (non-zero) weights and diffusers' model holding the same weights; with
    compile_blocks, every transformer block of both is torch.compile'd."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    ours = build_dit("tiny", positions="rope3d", max_text_tokens=text_tokens, **overrides)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.05)
    config = {k: v for k, v in config_to_diffusers(ours.config).items() if not k.startswith("_")}
    ref = CogVideoXTransformer3DModel(**config)
    ref.load_state_dict({to_diffusers_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    if compile_blocks:
        ours.compile_blocks()  # what `compile: true` in the DiT config does
        for block in ref.transformer_blocks:
            block.compile()
    return ours, ref


class Runner:
    """Calls a model on channel-first inputs and trains it with AdamW (see the module docstring)."""

    def __init__(self, model, is_ref: bool, inputs):
        from cogvx_train.train.optimizer import adamw

        self.model, self.is_ref, self.inputs = model, is_ref, inputs
        betas, eps = (0.9, 0.999), 1e-8  # torch's defaults, for both
        self.opt = (torch.optim.AdamW(model.parameters(), lr=1e-4, betas=betas, eps=eps) if is_ref
                    else adamw(model.parameters(), lr=1e-4, betas=betas, eps=eps, weight_decay=0.01))

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

    def timed_phases(self) -> tuple[float, float, float]:
        """Process CPU seconds of forward (with the loss), backward and the optimizer step."""
        c0 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.forward(), self.inputs[4])
        c1 = time.process_time()
        loss.backward()
        c2 = time.process_time()
        self.opt.step()
        return c1 - c0, c2 - c1, time.process_time() - c2


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


def interleaved(runners: dict[str, Runner], reps: int) -> dict[str, list[tuple[float, float]]]:
    """(process CPU s, wall s) of `reps` steps per runner, interleaved, the order rotating every rep."""
    names = list(runners)
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[n].step()
            times[n].append((time.process_time() - c0, time.perf_counter() - t0))
    return times


def median_ratio(times, a: str, b: str, which: int = 0) -> float:
    """Median over reps of the per-rep ratio a / b (which: 0 process CPU time, 1 wall clock)."""
    return statistics.median(x[which] / y[which] for x, y in zip(times[a], times[b]))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward")


def profile_table(name: str, runners: dict[str, Runner], reps: int) -> None:
    """Where an eager step's time goes, ours vs diffusers: phases by process CPU time (interleaved medians) and
    the self time of SDPA and GEMM kernels in forward + backward (torch.profiler, which inflates the rest)."""
    from torch.profiler import ProfilerActivity, profile

    phases = {n: [] for n in runners}
    for _ in range(reps):
        for n, r in runners.items():
            phases[n].append(r.timed_phases())
    shares = {n: collections.defaultdict(list) for n in runners}  # kernel kind -> its share of fwd+bwd, per rep
    for _ in range(reps):
        for n, r in runners.items():
            r.opt.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                F.mse_loss(r.forward(), r.inputs[4]).backward()
            kinds = collections.Counter()
            for event in prof.key_averages():
                kinds["SDPA" if "scaled_dot_product" in event.key else
                      "GEMM" if event.key in GEMM_OPS else "other"] += event.self_cpu_time_total
            for kind in ("SDPA", "GEMM", "other"):
                shares[n][kind].append(kinds[kind] / sum(kinds.values()))
    print(f"[{name}] where the eager step goes (ms; phases: process CPU medians; kernel split of fwd+bwd: median "
          f"shares under torch.profiler times the measured fwd+bwd)")
    print(f"[{name}]   {'':10s} {'fwd':>7s} {'bwd':>7s} {'AdamW':>7s} {'step':>7s} | {'SDPA':>7s} {'GEMM':>7s} "
          f"{'other':>7s}")
    rows = {}
    for n in runners:
        fwd, bwd, opt = (1e3 * statistics.median(p[i] for p in phases[n]) for i in range(3))
        sdpa, gemm, other = ((fwd + bwd) * statistics.median(shares[n][k]) for k in ("SDPA", "GEMM", "other"))
        rows[n] = (fwd, bwd, opt, sdpa, gemm)
        print(f"[{name}]   {n:10s} {fwd:7.1f} {bwd:7.1f} {opt:7.1f} {fwd + bwd + opt:7.1f} | {sdpa:7.1f} "
              f"{gemm:7.1f} {other:7.1f}")
    (fa, ba, oa, sa, ga), (fb, bb, ob, _, _) = rows["ours"], rows["diffusers"]
    print(f"[{name}]   SDPA + GEMM + AdamW are {100 * (sa + ga + oa) / (fa + ba + oa):.0f}% of our step; with "
          f"everything else free ours would be {(sa + ga + oa) / (fb + bb + ob):.2f}x diffusers' step")


def bench(name: str, reps: int, compile_blocks: bool, profile: bool) -> dict[str, float]:
    overrides, batch, frames, height, width, text_tokens = CONFIGS[name]
    ours, ref = build_pair(overrides, text_tokens)
    cfg = ours.config
    torch.manual_seed(1)
    latents = torch.randn(batch, cfg.in_channels, frames, height, width)
    inputs = (latents, torch.randint(0, 1000, (batch,)), torch.randn(batch, text_tokens, cfg.text_embed_dim),
              rope3d_frequencies(frames, height // 2, width // 2, cfg.head_dim), torch.randn_like(latents))
    runners = {"ours": Runner(ours, False, inputs), "diffusers": Runner(ref, True, inputs)}
    if compile_blocks:
        ours_c, ref_c = build_pair(overrides, text_tokens, compile_blocks=True)
        runners |= {"ours_c": Runner(ours_c, False, inputs), "diffusers_c": Runner(ref_c, True, inputs)}

    with torch.no_grad():
        expected = runners["ours"].forward()
        diffs = {n: (r.forward() - expected).abs().max().item() for n, r in runners.items() if n != "ours"}
    if max(diffs.values()) > 1e-5:
        raise SystemExit(f"{name}: outputs differ from ours (eager) by {diffs} > 1e-5; timings would compare "
                         f"different models")

    a, b = runners["ours"], runners["diffusers"]
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
    losses = {}
    for n, r in runners.items():  # first step from identical weights (and, compiled, the compilation)
        t0 = time.perf_counter()
        losses[n] = r.step()
        if n.endswith("_c"):
            print(f"[{name}] {n}: first step (compiles forward and backward) {time.perf_counter() - t0:.1f} s")
    interleaved(runners, 2)  # warm-up
    times = interleaved(runners, reps)

    print(f"[{name}] B={batch} tokens={tokens} layers={cfg.num_layers} hidden={cfg.hidden_size}: "
          f"max|out diff| vs ours {', '.join(f'{n} {d:.1e}' for n, d in diffs.items())}; first-step loss "
          f"{', '.join(f'{n} {v:.6f}' for n, v in losses.items())}")
    print(f"[{name}] FLOPs/step: analytic hardware {analytic:.4g} == FlopCounterMode {counted:.4g} "
          f"({100 * (counted / analytic - 1):+.2f}%), model {model_flops:.4g}")
    print(f"[{name}] step medians (process CPU / wall ms): " + ", ".join(
        f"{n} {1e3 * statistics.median(t[0] for t in ts):.1f} / {1e3 * statistics.median(t[1] for t in ts):.1f}"
        for n, ts in times.items()))
    ratios = {"eager": median_ratio(times, "ours", "diffusers")}
    print(f"[{name}] eager ours/diffusers: CPU-time median ratio {ratios['eager']:.3f} (per-rep "
          f"{', '.join(f'{x[0] / y[0]:.2f}' for x, y in zip(times['ours'], times['diffusers']))}); wall "
          f"{median_ratio(times, 'ours', 'diffusers', 1):.3f}")
    if compile_blocks:
        ratios["compiled"] = median_ratio(times, "ours_c", "diffusers_c")
        ratios["ours_c/diffusers"] = median_ratio(times, "ours_c", "diffusers")
        print(f"[{name}] compiled, like for like: ours_c/diffusers_c {ratios['compiled']:.3f} (wall "
              f"{median_ratio(times, 'ours_c', 'diffusers_c', 1):.3f}); ours_c/diffusers eager "
              f"{ratios['ours_c/diffusers']:.3f}; compile speeds ours up "
              f"{1 / median_ratio(times, 'ours_c', 'ours'):.2f}x, diffusers "
              f"{1 / median_ratio(times, 'diffusers_c', 'diffusers'):.2f}x")
    ratios["act_bytes"] = bytes_a / bytes_b
    print(f"[{name}] saved activations: ours {bytes_a / 2**20:.2f} MiB, diffusers {bytes_b / 2**20:.2f} MiB, "
          f"ratio {bytes_a / bytes_b:.3f}; ours with gradient checkpointing {bytes_gc / 2**20:.2f} MiB = "
          f"{bytes_gc / boundary:.2f}x the per-layer block inputs (L*T*d*4 bytes)")
    if profile:
        profile_table(name, {"ours": a, "diffusers": b}, reps)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", default="tiny,2k")
    parser.add_argument("--compile", action="store_true", help="also time both models with compiled blocks")
    parser.add_argument("--profile", action="store_true", help="print where the eager step's time goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    results = {name: bench(name, args.reps, args.compile, args.profile) for name in names}
    print("ratios ours/diffusers (process CPU time, interleaved medians): " + "  ".join(
        f"{n}: " + " ".join(f"{k} {v:.3f}" for k, v in r.items()) for n, r in results.items()))


if __name__ == "__main__":
    main()

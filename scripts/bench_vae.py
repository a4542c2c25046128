"""Peak memory and time of chunked VAE encode/decode against clip length: ours vs diffusers' AutoencoderKLCogVideoX.

Both models share one seeded set of weights (a reduced-channel CogVideoX config) and the same inputs, and run under
torch.no_grad with the same frame batching: 8 input frames per encoder chunk, 2 latent frames per decoder chunk
(diffusers' defaults; ours: ``chunk_frames=8``, ``chunk_latent_frames=2``). Outputs are checked to match first.

Every (implementation, frame count) runs in a fresh subprocess, so peak memory is not polluted by earlier runs:
peak = VmHWM - VmRSS measured around the call, with the high-water mark reset through /proc/self/clear_refs
(glibc's mmap threshold is pinned so freed activations really leave the process). Time is the median of warm
runs in that subprocess, as wall time and as process CPU time (less sensitive to other load on a shared machine).
One thread: on an oversubscribed machine two OpenMP threads stall at every barrier, which swamps small ops.
Runs are interleaved ours/ours-native/diffusers/... and repeated; medians are reported.

    python scripts/bench_vae.py [--frames 9 17 33 49 65] [--size 64 96] [--reps 3]

"ours-native" is ours with PyTorch's default conv dispatch instead of oneDNN (causal_conv.conv3d), to separate
the gain of the conv kernel choice from the rest. Before the last line: the causal-conv cache a chunked pass carries and
our peak growth once a clip streams (peak@49 / peak@17). Last line: our peak@49 / peak@9, our peak / diffusers' peak and
our time / diffusers' time (medians over frame counts; native-conv variant in brackets), for encode and decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(block_out_channels=(32, 64, 64, 128), layers_per_block=2, norm_num_groups=8, latent_channels=16)
IMPLS = ("ours", "ours-native", "diffusers")


def _status(field: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_of(fn) -> tuple[int, object]:
    """Bytes by which fn() raises the resident set above where it started, and fn's result."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    out = fn()
    return _status("VmHWM") - before, out


def worker(impl: str, frames: int, size: tuple[int, int], weights: str, timed: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file

    state = load_file(weights)
    if impl.startswith("ours"):
        from cogvx_train.vae import build_vae

        if impl == "ours-native":  # PyTorch's own conv dispatch instead of oneDNN (see causal_conv.conv3d)
            import cogvx_train.vae.causal_conv as causal_conv

            causal_conv._MKLDNN = False

        model = build_vae("tiny", **CONFIG).eval()
        encode = lambda x: model.encode(x, chunk_frames=8).mean  # noqa: E731
        decode = lambda z: model.decode(z, chunk_latent_frames=2)  # noqa: E731
    else:
        from diffusers import AutoencoderKLCogVideoX

        model = AutoencoderKLCogVideoX(**CONFIG).eval()  # default batching: 8 frames / 2 latent frames
        encode = lambda x: model.encode(x).latent_dist.mean  # noqa: E731
        decode = lambda z: model.decode(z).sample  # noqa: E731
    model.load_state_dict(state)
    x = torch.randn(1, 3, frames, *size, generator=torch.Generator().manual_seed(0))
    result = {}
    with torch.no_grad():
        result["enc_peak"], z = _peak_of(lambda: encode(x))
        result["dec_peak"], _ = _peak_of(lambda: decode(z))
        for phase, fn, arg in (("enc", encode, x), ("dec", decode, z)):
            times, cpu = [], []
            for _ in range(timed):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(arg)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            result[f"{phase}_time"] = statistics.median(times)
            result[f"{phase}_cpu"] = statistics.median(cpu)
        if impl.startswith("ours"):  # the state a chunked pass carries: every causal conv's last k-1 input frames
            for phase, net, fn, arg in (("enc", model.encoder, encode, x), ("dec", model.decoder, decode, z)):
                contexts = []
                hook = net.register_forward_pre_hook(lambda module, args: contexts.append(args[1]))
                fn(arg)
                hook.remove()
                cache = contexts[-1].cache or {}
                result[f"{phase}_cache"] = sum(t.numel() * t.element_size() for t in cache.values())
    return result


def check_outputs_match(weights: str, size: tuple[int, int]) -> float:
    """Max abs difference of ours vs diffusers (encode mean and decode) on 17 frames."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import load_file

    from cogvx_train.vae import build_vae

    state = load_file(weights)
    ours, ref = build_vae("tiny", **CONFIG).eval(), AutoencoderKLCogVideoX(**CONFIG).eval()
    ours.load_state_dict(state)
    ref.load_state_dict(state)
    x = torch.randn(1, 3, 17, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean
        diff = (ours.encode(x, chunk_frames=8).mean - z).abs().max()
        diff = max(diff, (ours.decode(z, chunk_latent_frames=2) - ref.decode(z).sample).abs().max())
    return float(diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 49, 65])
    parser.add_argument("--size", type=int, nargs=2, default=[64, 96])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every subprocess")
    parser.add_argument("--timed", type=int, default=3, help="timed runs inside each subprocess")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "FRAMES", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(args.size)
    if args.worker:
        impl, frames, weights = args.worker
        print(json.dumps(worker(impl, int(frames), size, weights, args.timed)))
        return

    import torch
    from safetensors.torch import save_file

    from cogvx_train.vae import build_vae

    torch.manual_seed(0)
    weights = Path(tempfile.mkdtemp()) / "bench_vae.safetensors"
    save_file({k: v.contiguous() for k, v in build_vae("tiny", **CONFIG).state_dict().items()}, str(weights))
    print(f"config {CONFIG}, frames {args.frames} at {size[0]}x{size[1]}, {args.reps} interleaved reps, "
          f"{args.timed} timed runs each, torch {torch.__version__}, 1 thread")
    diff = check_outputs_match(str(weights), size)
    print(f"ours vs diffusers, max abs diff on 17 frames (encode mean, decode): {diff:.2e}")

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.reps):
        for frames in args.frames:
            for impl in IMPLS:
                cmd = [sys.executable, __file__, "--worker", impl, str(frames), str(weights),
                       "--size", *map(str, size), "--timed", str(args.timed)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                runs.setdefault((impl, frames), []).append(json.loads(out.strip().splitlines()[-1]))

    def med(impl: str, frames: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(impl, frames)])

    mib = 2**20
    print("columns: ours / ours with PyTorch's default conv dispatch (ours-native) / diffusers")
    print(f"{'frames':>6} | {'enc peak MiB':>21} | {'dec peak MiB':>21} | {'enc wall s':>18} | {'dec wall s':>18} | "
          f"{'enc cpu s':>18} | {'dec cpu s':>18}")
    for frames in args.frames:
        cells = [" / ".join(f"{med(i, frames, k) / mib:5.0f}" for i in IMPLS) for k in ("enc_peak", "dec_peak")]
        cells += [" / ".join(f"{med(i, frames, k):4.1f}" for i in IMPLS) for k in ("enc_time", "dec_time", "enc_cpu",
                                                                                     "dec_cpu")]
        print(f"{frames:>6} | " + " | ".join(f"{c:>21}" for c in cells[:2]) + " | "
              + " | ".join(f"{c:>18}" for c in cells[2:]))

    lo, hi = (49 if 49 in args.frames else max(args.frames)), min(args.frames)
    streamed = [f for f in args.frames if f > 9]  # 9 frames (3 latent) are one chunk: nothing is carried
    growth = ""
    if streamed and lo > min(streamed):
        first = min(streamed)
        growth = (f"; ours peak@{lo}/peak@{first} (growth once streaming): encode "
                  f"{med('ours', lo, 'enc_peak') / med('ours', first, 'enc_peak'):.2f}, decode "
                  f"{med('ours', lo, 'dec_peak') / med('ours', first, 'dec_peak'):.2f}")
    print(f"carried causal-conv cache at {lo} frames: encode {med('ours', lo, 'enc_cache') / mib:.1f} MiB, decode "
          f"{med('ours', lo, 'dec_cache') / mib:.1f} MiB{growth}")
    def ratio(a: str, b: str, key: str) -> float:  # median over frame counts
        return statistics.median(med(a, f, key) / med(b, f, key) for f in args.frames)

    parts = []
    for phase in ("enc", "dec"):
        growth = med("ours", lo, f"{phase}_peak") / med("ours", hi, f"{phase}_peak")
        mem, tim, cpu = (f"{ratio('ours', 'diffusers', f'{phase}_{k}'):.2f} "
                         f"(native conv {ratio('ours-native', 'diffusers', f'{phase}_{k}'):.2f})"
                         for k in ("peak", "time", "cpu"))
        parts.append(f"{phase}: ours peak@{lo}/peak@{hi} {growth:.2f}, peak ours/diffusers {mem}, "
                     f"time ours/diffusers {tim}, cpu time {cpu}")
    print("ratios | " + " | ".join(parts))


if __name__ == "__main__":
    main()

"""The CogVideoX 3D causal VAE: Encoder, Decoder, CausalVAE (encode/decode, chunking, tiling) and named sizes.

A video [B, 3, 1 + 4k, H, W] in [-1, 1] becomes a posterior over latents [B, 16, 1 + k, H/8, W/8]; frame 0 is
encoded on its own (causal convs, frame 0 kept apart when time is down/up-sampled), so images are 1-frame
videos. Module and parameter names follow diffusers' AutoencoderKLCogVideoX, so its checkpoints load with the
identity key map (see diffusers_format.py).

Long clips. ``encode(x, chunk_frames=n)`` runs the encoder on frame 0 plus n frames, then n frames at a time,
carrying every causal conv's last frames from chunk to chunk; ``decode(z, chunk_latent_frames=n)`` does the same
on latent frames. Peak memory then depends on n, not on the clip length. Chunked and one-pass results are the
same computation, because GroupNorm statistics are taken per fixed window of frames (``encoder_norm_window``,
``decoder_norm_window``; see blocks.py) and chunks must hold whole windows. The released setting (8 input
frames, 2 latent frames, first window one frame longer) is what diffusers computes by default for 8k+1 frames.
A model with whole-clip statistics (window None) can be run in one pass or context-parallel, not streamed.

``tile=True`` additionally splits H and W into overlapping tiles blended linearly; GroupNorm statistics are then
per tile, so tiled output is close to, not equal to, untiled output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogvx_train.vae.blocks import Downsample3d, GroupNorm3d, ResnetBlock3d, SpatialNorm3d, Upsample3d, norm_silu_conv
from cogvx_train.vae.causal_conv import CausalConv3d, FrameContext
from cogvx_train.vae.posterior import DiagonalGaussian


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the causal VAE; field names follow diffusers' AutoencoderKLCogVideoX config."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)  # one level each; all but the last halve H, W
    layers_per_block: int = 3  # ResNet blocks per encoder level; decoder levels have one more
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4  # the first log2(ratio) levels also halve T (frame 0 apart)
    scaling_factor: float = 1.15258426  # latents * scaling_factor feed the diffusion model (5B: 0.7)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # Initial log-variance of the posterior (training from scratch only; loaded weights replace it). -6 = std 0.05:
    # at PyTorch's default init the posterior mean has std ~0.3, so a logvar of ~0 (std 1) would bury the latent
    # in noise and the decoder learns little for hundreds of steps (tests/vae_training/test_vae_generalises.py).
    # Trained VAEs end with small posterior variances anyway (KL weight 1e-6): this starts near where they go.
    logvar_init: float = -6.0
    factorized: bool = False  # 2D spatial + causal 1D temporal convs (ablation; no diffusers weights)
    encoder_norm_window: int | None = 8  # GroupNorm statistics window in input frames after frame 0; None = clip
    decoder_norm_window: int | None = 2  # same in latent frames
    tile_sample_size: tuple[int, int] = (240, 360)  # (H, W) of a pixel tile when tile=True
    tile_overlap: tuple[int, int] = (40, 72)  # pixels shared by neighbouring tiles, blended linearly

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        """Raise ValueError with one sentence for the first inconsistent field."""
        levels = len(self.block_out_channels)
        ratio = self.temporal_compression_ratio
        if levels < 1 or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be non-empty multiples of "
                f"norm_num_groups={self.norm_num_groups}."
            )
        if ratio < 1 or ratio & (ratio - 1) or ratio > 2 ** (levels - 1):
            raise ValueError(
                f"temporal_compression_ratio must be a power of 2 up to {2 ** (levels - 1)} for {levels} levels, "
                f"got {ratio}."
            )
        if self.encoder_norm_window is not None and (
            self.encoder_norm_window < ratio or self.encoder_norm_window % ratio
        ):
            raise ValueError(
                f"encoder_norm_window must be a positive multiple of temporal_compression_ratio={ratio} (or None), "
                f"got {self.encoder_norm_window}."
            )
        if self.decoder_norm_window is not None and self.decoder_norm_window < 1:
            raise ValueError(
                f"decoder_norm_window must be >= 1 latent frame (or None), got {self.decoder_norm_window}."
            )
        if not self.logvar_min < self.logvar_max:
            raise ValueError(f"logvar_min {self.logvar_min} must be below logvar_max {self.logvar_max}.")
        if not self.logvar_min <= self.logvar_init <= self.logvar_max:
            raise ValueError(f"logvar_init {self.logvar_init} must lie in [logvar_min, logvar_max] = "
                             f"[{self.logvar_min}, {self.logvar_max}].")
        s = self.spatial_compression
        for size, overlap in zip(self.tile_sample_size, self.tile_overlap):
            if size % s or overlap % s or not 0 <= overlap < size:
                raise ValueError(
                    f"tile_sample_size {self.tile_sample_size} and tile_overlap {self.tile_overlap} must be multiples "
                    f"of {s} with overlap < size."
                )


VAE_SIZES: dict[str, VAEConfig] = {
    "tiny": VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                      tile_sample_size=(32, 32), tile_overlap=(16, 16)),
    "cogvideox": VAEConfig(),  # CogVideoX-2B release
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),  # same network, 5B release's latent scale
}


def build_vae(size: str, **overrides) -> CausalVAE:
    """A freshly initialised CausalVAE of a named size, with any VAEConfig field overridden."""
    if size not in VAE_SIZES:
        raise ValueError(f"Unknown VAE size {size!r}; choose one of {sorted(VAE_SIZES)}.")
    names = {f.name for f in fields(VAEConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown VAEConfig field(s) {unknown}; valid fields are {sorted(names)}.")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return CausalVAE(replace(VAE_SIZES[size], **overrides))


class Level(nn.Module):
    """One resolution level: ResNet blocks, then an optional down- or up-sampler (diffusers' down/up block)."""

    def __init__(self, resnets: list[ResnetBlock3d], samplers: list[nn.Module], sampler_name: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.sampler_name = sampler_name
        setattr(self, sampler_name, nn.ModuleList(samplers))  # "downsamplers" / "upsamplers"; empty at the end

    def steps(self, ctx: FrameContext, zq: torch.Tensor | None, use_checkpoint: bool):
        """The level as a sequence of h -> h functions (its blocks, then its sampler). The network's forward runs
        them one by one, so no frame holds a level's input while the later blocks run: without gradients it is
        freed after the first block (decoder peak 44 -> 38 MiB at 9 frames, 62 -> 58 at 49 in scripts/bench_vae.py's
        config; BENCHMARKS.md)."""
        for resnet in self.resnets:
            if use_checkpoint:
                yield lambda h, resnet=resnet: checkpoint(resnet, h, ctx, zq, use_reentrant=False)
            else:
                yield lambda h, resnet=resnet: resnet(h, ctx, zq)
        for sampler in getattr(self, self.sampler_name):
            yield lambda h, sampler=sampler: sampler(h, ctx)

    def forward(self, h: torch.Tensor, ctx: FrameContext, zq: torch.Tensor | None, use_checkpoint: bool):
        for step in self.steps(ctx, zq, use_checkpoint):
            h = step(h)
        return h


def _window(window: int | None, frames_per_unit: float) -> int | None:
    """A window given in input (or latent) frames, expressed in the frames of a deeper (or finer) layer."""
    return None if window is None else int(window * frames_per_unit)


class Encoder(nn.Module):
    """x [B, 3, T, H, W] -> moments [B, 2 * latent, 1 + (T-1)/r, H/s, W/s] (mean and logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, eps, fact = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.factorized
        time_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, fact)
        self.down_blocks = nn.ModuleList()
        time_scale, prev = 1, ch[0]
        for i, out in enumerate(ch):
            win = _window(cfg.encoder_norm_window, 1 / time_scale)
            resnets = [ResnetBlock3d(prev if j == 0 else out, out, groups, eps, win, None, fact)
                       for j in range(cfg.layers_per_block)]
            samplers = [Downsample3d(out, compress_time=i < time_levels)] if i < len(ch) - 1 else []
            self.down_blocks.append(Level(resnets, samplers, "downsamplers"))
            time_scale *= 2 if i < time_levels else 1
            prev = out
        win = _window(cfg.encoder_norm_window, 1 / time_scale)
        self.mid_block = Level([ResnetBlock3d(prev, prev, groups, eps, win, None, fact) for _ in range(2)], [],
                               "downsamplers")
        self.norm_out = GroupNorm3d(groups, prev, eps, win)
        self.conv_out = CausalConv3d(prev, 2 * cfg.latent_channels, 3, fact)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        h = self.conv_in(x, ctx)
        for level in (*self.down_blocks, self.mid_block):
            for step in level.steps(ctx, None, use_checkpoint):  # not level(h): see Level.steps
                h = step(h)
        return norm_silu_conv(lambda out: self.norm_out(h, ctx, out=out), self.conv_out, h, ctx)


class Decoder(nn.Module):
    """z [B, latent, t, h, w] -> x [B, 3, 1 + (t-1)r, h*s, w*s]; every norm is a SpatialNorm conditioned on z."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        groups, eps, fact = cfg.norm_num_groups, cfg.norm_eps, cfg.factorized
        zc = cfg.latent_channels
        time_levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, ch[0], 3, fact)
        win = _window(cfg.decoder_norm_window, 1)
        self.mid_block = Level([ResnetBlock3d(ch[0], ch[0], groups, eps, win, zc, fact) for _ in range(2)], [],
                               "upsamplers")
        self.up_blocks = nn.ModuleList()
        time_scale, prev = 1, ch[0]
        for i, out in enumerate(ch):
            win = _window(cfg.decoder_norm_window, time_scale)
            resnets = [ResnetBlock3d(prev if j == 0 else out, out, groups, eps, win, zc, fact)
                       for j in range(cfg.layers_per_block + 1)]
            samplers = [Upsample3d(out, compress_time=i < time_levels)] if i < len(ch) - 1 else []
            self.up_blocks.append(Level(resnets, samplers, "upsamplers"))
            time_scale *= 2 if i < time_levels else 1
            prev = out
        self.norm_out = SpatialNorm3d(prev, zc, groups, eps, _window(cfg.decoder_norm_window, time_scale))
        self.conv_out = CausalConv3d(prev, cfg.out_channels, 3, fact)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        h = self.conv_in(z, ctx)
        for level in (self.mid_block, *self.up_blocks):
            for step in level.steps(ctx, z, use_checkpoint):  # not level(h): see Level.steps
                h = step(h)
        return norm_silu_conv(lambda out: self.norm_out(h, z, ctx, out=out), self.conv_out, h, ctx)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size): stride tile - overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, rise: bool, fall: bool, like: torch.Tensor) -> torch.Tensor:
    """Blend weight along one axis of a tile: linear over ``overlap`` at edges shared with a neighbour, else 1."""
    w = torch.ones(length, dtype=like.dtype, device=like.device)
    ramp = torch.arange(1, overlap + 1, dtype=like.dtype, device=like.device) / (overlap + 1)
    if rise and overlap:
        w[:overlap] = ramp
    if fall and overlap:
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


class CausalVAE(nn.Module):
    """3D causal VAE with the public API of this package; see the module docstring."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.cp_group = None
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """PyTorch default init for convs (as diffusers), GroupNorm to identity; factorized temporal convs start
        as the identity (a delta on the current frame), so each factorized conv starts as its per-frame 2D conv;
        the posterior's log-variance starts at the constant ``logvar_init`` (see VAEConfig)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.GroupNorm)):
                module.reset_parameters()
        for module in self.modules():  # after the loop above, which would reset the temporal convs again
            if isinstance(module, CausalConv3d) and module.factorized:
                nn.init.zeros_(module.temporal_conv.weight)
                nn.init.zeros_(module.temporal_conv.bias)
                channels = module.temporal_conv.weight.shape[0]
                with torch.no_grad():
                    module.temporal_conv.weight[range(channels), range(channels), -1] = 1.0
        logvar_conv = self.encoder.conv_out.temporal_conv if self.encoder.conv_out.factorized \
            else self.encoder.conv_out.conv
        latent = self.config.latent_channels  # output channels: [mean; logvar]
        with torch.no_grad():
            logvar_conv.weight[latent:].zero_()
            logvar_conv.bias[latent:].fill_(self.config.logvar_init)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def last_decoder_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's last conv (the GAN adaptive weight differentiates the losses w.r.t. it)."""
        return self.decoder.conv_out.last_weight

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet block in the backward pass instead of storing its activations."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def enable_context_parallel(self, group) -> None:
        """From now on every call gets this rank's slice of each clip (see context_parallel.py)."""
        self.cp_group = group

    def disable_context_parallel(self) -> None:
        self.cp_group = None

    # ------------------------------------------------------------------------------------------- checks
    def _check(self, t: torch.Tensor, channels: int, time_unit: int, space_unit: int, what: str) -> None:
        """One sentence on what is wrong with a [B, C, T, H, W] input and what would work."""
        if self.cp_group is None or dist.get_rank(self.cp_group) == 0:
            rule, first = f"T = {time_unit}k+1", 1
        else:
            rule, first = f"T = {time_unit}k, k >= 1 (context-parallel rank > 0)", 0
        ok = t.dim() == 5 and t.shape[1] == channels and t.shape[2] > 0 and (t.shape[2] - first) % time_unit == 0
        if not ok or t.shape[-2] % space_unit or t.shape[-1] % space_unit:
            raise ValueError(
                f"{what} must be [B, {channels}, T, H, W] with {rule} and H, W multiples of {space_unit}; "
                f"got shape {tuple(t.shape)}."
            )

    # ------------------------------------------------------------------------------------- frame passes
    def _frames(self, net: nn.Module, x: torch.Tensor, chunk: int | None, window: int | None,
                time_out: float) -> torch.Tensor:
        """Run ``net`` over the frames of ``x`` in one pass, context-parallel, or in chunks of 1 + chunk, then chunk
        frames, carrying the causal-conv cache; ``time_out`` = output frames per input frame after frame 0."""
        if self.cp_group is not None:
            if chunk is not None:
                raise ValueError("Chunking and context parallelism do not combine; leave the chunk size at None "
                                 "inside temporal_context_parallel.")
            rank, world = dist.get_rank(self.cp_group), dist.get_world_size(self.cp_group)
            if window is not None and rank < world - 1 and (x.shape[2] - (rank == 0)) % window:
                raise ValueError(
                    f"Context-parallel rank {rank} holds {x.shape[2]} frames, which does not end on a GroupNorm window "
                    f"of {window}; split the clip with split_frames_for_rank(..., window={window})."
                )
            return net(x, FrameContext(has_first_frame=rank == 0, group=self.cp_group))
        frames = x.shape[2]
        if chunk is None or frames <= 1 + chunk:
            return net(x, FrameContext())
        if window is None:
            raise ValueError(
                "Chunked encoding/decoding needs per-window GroupNorm statistics, but this VAE normalises over the "
                "whole clip (norm window None); run it in one pass or build it with encoder_norm_window=8, "
                "decoder_norm_window=2."
            )
        if chunk < 1 or chunk % window:
            raise ValueError(
                f"The chunk size must be a positive multiple of the GroupNorm window {window}, got {chunk}."
            )
        bounds = [(0, 1 + chunk)] + [(s, min(s + chunk, frames)) for s in range(1 + chunk, frames, chunk)]
        ctx, out = FrameContext(cache={}), None
        for i, (start, end) in enumerate(bounds):
            ctx.has_first_frame = i == 0
            y = net(x[:, :, start:end], ctx)
            if out is None:  # allocate the whole output once, then write every chunk into it
                out = y.new_empty(*y.shape[:2], 1 + round((frames - 1) * time_out), *y.shape[3:])
            out_start = 0 if i == 0 else 1 + round((start - 1) * time_out)
            out[:, :, out_start : out_start + y.shape[2]] = y
        return out

    def _tiled(
        self, fn, x: torch.Tensor, tile: tuple[int, int], overlap: tuple[int, int], scale: float
    ) -> torch.Tensor:
        """Apply ``fn`` to overlapping (H, W) tiles of x and blend the results with linear ramps (weights sum to 1)."""
        height, width = x.shape[-2:]
        rows, cols = _tile_starts(height, tile[0], overlap[0]), _tile_starts(width, tile[1], overlap[1])
        out = weight = None
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                y = fn(x[..., r : r + tile[0], c : c + tile[1]])
                if out is None:
                    out = y.new_zeros(*y.shape[:3], int(height * scale), int(width * scale))
                    weight = y.new_zeros(int(height * scale), int(width * scale))
                oh, ow = int(overlap[0] * scale), int(overlap[1] * scale)
                mask = _ramp(y.shape[3], oh, i > 0, i < len(rows) - 1, y)[:, None] * _ramp(
                    y.shape[4], ow, j > 0, j < len(cols) - 1, y)[None, :]
                r0, c0 = int(r * scale), int(c * scale)
                out[..., r0 : r0 + y.shape[3], c0 : c0 + y.shape[4]] += y * mask
                weight[r0 : r0 + y.shape[3], c0 : c0 + y.shape[4]] += mask
        return out / weight

    # ---------------------------------------------------------------------------------------- public API
    def encode(self, x: torch.Tensor, chunk_frames: int | None = None, tile: bool = False) -> DiagonalGaussian:
        """Posterior q(z|x) for a video x [B, C, 4k+1, H, W] (H, W multiples of 8).

        chunk_frames: encode frame 0 plus this many frames, then this many at a time (a multiple of
            encoder_norm_window); same result as one pass, bounded memory. None: one pass.
        tile: split H, W into overlapping tiles (config.tile_sample_size / tile_overlap), blended linearly.
        """
        cfg = self.config
        self._check(x, cfg.in_channels, cfg.temporal_compression_ratio, cfg.spatial_compression, "The video")
        ratio = cfg.temporal_compression_ratio

        def run(frames: torch.Tensor) -> torch.Tensor:
            return self._frames(self.encoder, frames, chunk_frames, cfg.encoder_norm_window, 1 / ratio)

        s = cfg.spatial_compression
        moments = self._tiled(run, x, cfg.tile_sample_size, cfg.tile_overlap, 1 / s) if tile else run(x)
        return DiagonalGaussian(moments, cfg.logvar_min, cfg.logvar_max)

    def decode(self, z: torch.Tensor, chunk_latent_frames: int | None = None, tile: bool = False) -> torch.Tensor:
        """Video [B, C, 1 + 4(t-1), 8h, 8w] from unscaled latents z [B, 16, t, h, w] (divide diffusion latents
        by ``scaling_factor`` first). chunk_latent_frames / tile as in :meth:`encode`."""
        cfg = self.config
        s = cfg.spatial_compression
        self._check(z, cfg.latent_channels, 1, 1, "The latent")
        ratio = cfg.temporal_compression_ratio

        def run(latents: torch.Tensor) -> torch.Tensor:
            return self._frames(self.decoder, latents, chunk_latent_frames, cfg.decoder_norm_window, ratio)

        if not tile:
            return run(z)
        tile_size = (cfg.tile_sample_size[0] // s, cfg.tile_sample_size[1] // s)
        return self._tiled(run, z, tile_size, (cfg.tile_overlap[0] // s, cfg.tile_overlap[1] // s), s)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior) for x; z is sampled from the posterior, or its mean if not sample_posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

"""CogVideoX 3D causal VAE: model, named sizes, diffusers format, chunked/tiled/context-parallel execution.

Public API (videos and latents are [B, C, T, H, W]):

    vae = build_vae("tiny")                      # or "cogvideox", "cogvideox-5b"; **VAEConfig overrides
    posterior = vae.encode(x, chunk_frames=None, tile=False)   # DiagonalGaussian: mean, logvar, std, sample, mode, kl
    x_hat = vae.decode(z, chunk_latent_frames=None, tile=False)
    recon, posterior = vae(x, sample_posterior=True, generator=None)
    vae.last_decoder_layer_weight(), vae.scaling_factor, vae.config
    vae = load_diffusers_vae(path); export_diffusers_vae(vae, out_dir)
    with temporal_context_parallel(vae, group): ...       # see context_parallel.py
"""

from cogvx_train.vae.autoencoder import VAE_SIZES, CausalVAE, VAEConfig, build_vae
from cogvx_train.vae.context_parallel import (
    all_reduce_grads,
    temporal_context_parallel,
    frame_split_sizes,
    gather_frames,
    split_frames_for_rank,
)
from cogvx_train.vae.diffusers_format import export_diffusers_vae, load_diffusers_vae
from cogvx_train.vae.posterior import DiagonalGaussian

__all__ = [
    "CausalVAE",
    "DiagonalGaussian",
    "VAEConfig",
    "VAE_SIZES",
    "all_reduce_grads",
    "build_vae",
    "temporal_context_parallel",
    "export_diffusers_vae",
    "frame_split_sizes",
    "gather_frames",
    "load_diffusers_vae",
    "split_frames_for_rank",
]

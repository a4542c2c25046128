"""The demo's frozen VAE: `model.vae.weights=demo` in experiment=demo.

The DiT demo needs a VAE that actually reconstructs the synthetic clips. The first DiT demo run trains one with
`stage=vae_a1 experiment=demo` (a few minutes on a CPU) and caches its diffusers-format export in
`<paths.cache_dir>/demo-vae-v3`; later runs reuse it. Running the VAE demo yourself first has the same effect.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("cogvx_train")

DEMO_VAE = "demo-vae-v3"  # bumped whenever the demo VAE recipe changes (v2: posterior logvar_init, v3: measured
#                            scaling factor)


def demo_vae_dir(cfg: DictConfig) -> Path:
    target = Path(cfg.paths.cache_dir).expanduser() / DEMO_VAE
    if (target / "config.json").exists():
        return target
    log.warning("no demo VAE in %s yet: training one first (stage=vae_a1 experiment=demo, a few minutes)", target)
    from hydra import compose

    from cogvx_train.cli.train import train
    from cogvx_train.train.run_dir import RunDirectory

    vae_cfg = compose(config_name="train", overrides=[
        "stage=vae_a1", "experiment=demo", "logger=csv",
        f"paths.cache_dir={Path(cfg.paths.cache_dir).expanduser().resolve()}",
        f"paths.output_dir={Path(cfg.paths.output_dir).expanduser().resolve()}",
    ])
    run = RunDirectory(Path(cfg.paths.output_dir).expanduser() / "runs" / "vae_a1" / "demo-vae-for-dit")
    train(vae_cfg, run=run)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.copytree(run.export, tmp, dirs_exist_ok=True)
    os.replace(tmp, target)
    log.info("demo VAE cached in %s", target)
    return target

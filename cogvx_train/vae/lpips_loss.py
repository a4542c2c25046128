"""LPIPS (Zhang et al. 2018) as a frozen, fp32 measuring instrument for the VAE loss and the validation metrics.

Weights come from three places, and the choice is always explicit:
- the backbone (VGG16 / AlexNet ImageNet features): a local file (``backbone_path``: a torchvision checkpoint such as
  ``vgg16-397923af.pth``, or a state dict saved from an LPIPS backbone), else torchvision's own download / cache
  (``$TORCH_HOME/hub/checkpoints``), else - only when ``random_backbone=True`` - a seeded random initialisation;
- the linear calibration layers: the ``lpips`` package ships them (``lpips/weights/v0.1/<net>.pth``), or
  ``linear_path``.
``lpips.LPIPS`` loads its linear weights with ``strict=False``, which silently keeps random layers when a file
does not fit; here every expected key must be present, so a wrong file is an error, not a quietly different loss.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

log = logging.getLogger(__name__)

LPIPS_NETS = ("vgg", "alex")
# smallest frame side each backbone's pooling stack accepts
MIN_SIDE = {"vgg": 16, "alex": 32}
# fixed seed for a random backbone, so every rank and every run measures with the same random network
RANDOM_BACKBONE_SEED = 1234


def _load_file(path: str | Path, what: str, config_key: str) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{config_key}={path} does not exist; point it at a local {what} file.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{config_key}={path} does not hold a state dict of {what}.")
    return state


def load_backbone(model: lpips.LPIPS, path: str | Path) -> None:
    """Copy backbone weights from ``path`` into ``model.net``.

    LPIPS keeps torchvision's ``features[i]`` layers under ``net.slice<k>.<i>``, so a torchvision checkpoint key
    ``features.<i>.weight`` maps to ``slice<k>.<i>.weight``; files saved from an LPIPS backbone (``slice<k>...``, with
    or without the ``net.`` prefix) load as they are. The classifier of a torchvision checkpoint is ignored.
    """
    source = _load_file(path, f"{model.pnet_type} backbone weights", "vae_loss.lpips_backbone_path")
    target = model.net.state_dict()
    loaded = {}
    for key in target:
        layer_and_param = key.split(".", 1)[1]  # "slice2.5.weight" -> "5.weight"
        for candidate in (key, f"net.{key}", f"features.{layer_and_param}"):
            if candidate in source:
                loaded[key] = source[candidate]
                break
    missing = [k for k in target if k not in loaded]
    if missing:
        raise ValueError(f"vae_loss.lpips_backbone_path={path} does not hold {model.pnet_type} backbone weights "
                         f"(no entry for features.{missing[0].split('.', 1)[1]}); give the torchvision "
                         f"{'vgg16' if model.pnet_type == 'vgg' else 'alexnet'} checkpoint.")
    wrong = [k for k in target if loaded[k].shape != target[k].shape]
    if wrong:
        raise ValueError(f"vae_loss.lpips_backbone_path={path} has {wrong[0]} of shape {tuple(loaded[wrong[0]].shape)}"
                         f" where lpips_net={model.pnet_type} needs {tuple(target[wrong[0]].shape)}; the file is for "
                         "another network.")
    model.net.load_state_dict(loaded, strict=True)


def load_linear_layers(model: lpips.LPIPS, path: str | Path | None) -> None:
    """The calibrated 1x1 layers: the package's own file unless ``path`` is given; every layer must be found."""
    if path is None:
        path = Path(os.path.dirname(lpips.__file__)) / "weights" / "v0.1" / f"{model.pnet_type}.pth"
    source = _load_file(path, "LPIPS linear-layer weights", "vae_loss.lpips_linear_path")
    target = {k: v for k, v in model.state_dict().items() if k.startswith("lin") and not k.startswith("lins.")}
    missing = [k for k in target if k not in source or source[k].shape != target[k].shape]
    if missing:
        raise ValueError(f"LPIPS linear weights {path} lack a {tuple(target[missing[0]].shape)} entry {missing[0]} "
                         f"for lpips_net={model.pnet_type}; use the lpips package's weights/v0.1/"
                         f"{model.pnet_type}.pth.")
    model.load_state_dict({k: source[k] for k in target}, strict=False)


def build_lpips(net: str = "vgg", backbone_path: str | None = None, linear_path: str | None = None,
                random_backbone: bool = False) -> lpips.LPIPS:
    """An ``lpips.LPIPS`` whose weights came from exactly where the arguments say (see the module docstring)."""
    if net not in LPIPS_NETS:
        raise ValueError(f"vae_loss.lpips_net={net!r} is not one of {', '.join(LPIPS_NETS)}.")
    from_torchvision = backbone_path is None and not random_backbone
    with warnings.catch_warnings():
        # lpips still passes torchvision's deprecated `pretrained=` flag
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        if from_torchvision:
            try:
                model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=False, verbose=False)
            except Exception as err:  # no network, no cache, a proxy error...: all mean "no weights here"
                raise ValueError(
                    f"the LPIPS {net} backbone weights could not be loaded from torchvision's cache or download "
                    f"({type(err).__name__}: {err}); set vae_loss.lpips_backbone_path to a local torchvision "
                    f"{'vgg16' if net == 'vgg' else 'alexnet'} checkpoint, or vae_loss.lpips_random_backbone=true "
                    "for tests and demos.") from err
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_BACKBONE_SEED)
                model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    if backbone_path is not None:
        load_backbone(model, backbone_path)
        if random_backbone:
            log.warning("vae_loss.lpips_random_backbone=true is ignored because vae_loss.lpips_backbone_path is set.")
    elif random_backbone:
        log.warning("LPIPS uses a RANDOMLY INITIALISED %s backbone (vae_loss.lpips_random_backbone=true): the "
                    "perceptual loss and the val/lpips metric are not the published LPIPS. Use this for tests and "
                    "demos only; set vae_loss.lpips_backbone_path for real training.", net)
    load_linear_layers(model, linear_path)
    return model


class PerceptualLoss(nn.Module):
    """LPIPS distance per image: frozen, always in eval mode (its dropout stays off), computed in fp32."""

    def __init__(self, net: str = "vgg", backbone_path: str | None = None, linear_path: str | None = None,
                 random_backbone: bool = False):
        super().__init__()
        self.net_name = net
        self.lpips = build_lpips(net, backbone_path, linear_path, random_backbone)
        self.lpips.requires_grad_(False)
        self.lpips.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        # the LightningModule switches every child to train mode; LPIPS is an instrument and must not follow
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``, ``y``: ``[N, 3, H, W]`` in [-1, 1] -> ``[N]`` distances (gradients flow into ``x`` and ``y``)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two [N, 3, H, W] image batches of one shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}.")
        if min(x.shape[-2:]) < MIN_SIDE[self.net_name]:
            raise ValueError(f"frames of {tuple(x.shape[-2:])} are too small for the LPIPS {self.net_name} backbone; "
                             f"use frames of at least {MIN_SIDE[self.net_name]} pixels a side.")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lpips(x.float(), y.float()).flatten()  # [N, 1, 1, 1] -> [N]

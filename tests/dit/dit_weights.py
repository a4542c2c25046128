"""Random weights for DiT tests (imported by the tests of this folder)."""

import torch


def randomized(model, seed=0):
    """Weights that exercise every path: O(1) activations, LayerNorm gains near 1 (adaLN-Zero init would make
    every block an identity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5)
    return model

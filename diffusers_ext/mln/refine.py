"""Quantisation refinement outside the edit mask (official code v2, ``refine``).

The multi-scale residual quantiser leaves a residual ``r = f - f_hat`` between the source image's continuous
features ``f`` and what its tokens express. Refinement projects that residual onto the codebook span with a soft
assignment, ``proj = softmax(r E^T / tau) E`` per position, adds it to a running reconstruction, and keeps the
projections only where ``keep = 1 - mask`` is on: the source's own detail comes back outside the edit region; inside,
the edited features are untouched.

Example::

    from diffusers_ext.mln.refine import refine_outside_mask
    out = refine_outside_mask(f, f_hat, codebook, keep, steps=5, tau=0.2)
"""

from __future__ import annotations

import torch


def refine_outside_mask(f: torch.Tensor, f_hat: torch.Tensor, codebook: torch.Tensor, keep: torch.Tensor,
                        steps: int = 5, tau: float = 0.2, tol: float = 1e-4) -> torch.Tensor:
    """Refined features (B, C, G, G).

    ``f`` source features, ``f_hat`` edited features (both (B, C, G, G)), ``codebook`` (V, C), ``keep`` (B, 1, G, G)
    in [0, 1] (1 = outside the edit mask). Iterates ``cur <- cur + proj(f - cur)``, ``out <- out + proj * keep``,
    stopping early when the RMS residual falls below ``tol``. ``steps = 0`` returns ``f_hat`` unchanged.
    """
    B, C, H, W = f_hat.shape
    E = codebook.float()
    f = f.float()
    cur = f_hat.float().clone()
    out = f_hat.float().clone()
    keep = keep.float()
    for _ in range(steps):
        r = f - cur
        if r.pow(2).mean().sqrt().item() < tol:
            break
        z = r.permute(0, 2, 3, 1).reshape(-1, C)
        proj = ((z @ E.T) / tau).softmax(-1) @ E
        proj = proj.view(B, H, W, C).permute(0, 3, 1, 2)
        cur = cur + proj
        out = out + proj * keep
    return out

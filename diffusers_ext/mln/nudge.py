"""Logit nudging toward source tokens, and the TV-adaptive weight (official code v2).

``nudge(z)_i = z_i + c_i (onehot(y_i) - softmax(z_i))`` is one gradient-ascent step of size ``c_i`` on
``log p(y_i | z_i)`` (the gradient of ``log softmax(z)_y`` w.r.t. ``z`` is ``onehot(y) - softmax(z)``), so it pulls the
logits toward the source token ``y_i`` by a bounded amount: every logit moves by at most ``c_i`` (each entry of
``onehot - softmax`` lies in [-1, 1]).

Example::

    import torch
    from diffusers_ext.mln.nudge import nudge_logits, tv_weight
    z_t, z_s = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    w = tv_weight(z_t, z_s, gamma=1.5)                         # (1, 4) in [0, 1]
    z = nudge_logits(z_t, torch.tensor([[3, 1, 0, 7]]), 12.0 * w)
"""

from __future__ import annotations

import torch


def total_variation(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """``0.5 * || softmax(z_a) - softmax(z_b) ||_1`` per token: (B, l) in [0, 1]."""
    return 0.5 * (z_a.float().softmax(-1) - z_b.float().softmax(-1)).abs().sum(-1)


def tv_weight(z_t: torch.Tensor, z_s: torch.Tensor, gamma: float = 1.5) -> torch.Tensor:
    """``w_i = clamp(1 - TV_i / max_j TV_j, 0, 1) ** gamma`` over the tokens j of each image (B, l).

    Tokens on which the target and source prompts agree keep weight 1 (anchored to the source); the token where
    they disagree most gets 0 (free). If the prompts agree everywhere, every weight is 1.
    """
    tv = total_variation(z_t, z_s)
    top = tv.amax(dim=-1, keepdim=True)
    rel = torch.where(top > 0, tv / top.clamp_min(torch.finfo(tv.dtype).tiny), torch.zeros_like(tv))
    return (1 - rel).clamp(0, 1).pow(gamma)


def nudge_logits(z: torch.Tensor, target: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """``z + strength * (onehot(target) - softmax(z))``; ``z`` (B, l, V), ``target`` (B, l), ``strength`` a
    scalar or (B, l). Returns fp32 logits."""
    z = z.float()
    strength = torch.as_tensor(strength, dtype=z.dtype, device=z.device)
    if strength.ndim == 2:
        strength = strength[..., None]
    if not torch.any(strength != 0):
        return z
    step = -z.softmax(-1)
    step.scatter_add_(-1, target[..., None].long(), torch.ones_like(target[..., None], dtype=z.dtype))
    return z + strength * step

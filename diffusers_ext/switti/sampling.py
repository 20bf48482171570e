"""Token sampling of scale-wise VAR models (Switti / VAR ``models/helpers.py`` semantics), with explicit generators.

* :func:`sample_top_k_top_p`: nucleus + top-k sampling of hard token indices;
* :func:`gumbel_softmax`: the soft Gumbel-softmax of Switti's ``more_smooth`` option (a probability vector per token,
  whose codebook-weighted mean becomes the token's embedding).

Both draw all their randomness from the ``generator`` passed, so a run is a pure function of its seed.
"""

from __future__ import annotations

import torch


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one index per row of ``logits`` (B, l, V) after top-k and top-p filtering; returns (B, l)."""
    B, l, V = logits.shape
    logits = logits.float().clone()
    if top_k > 0 and top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax ``softmax((logits + g) / tau)`` with ``g = -log(Exp(1))`` drawn from ``generator``."""
    logits = logits.float()
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()
    return ((logits + gumbels) / tau).softmax(-1)


def gumbel_tau(ratio: float) -> float:
    """Switti's soft-sampling temperature at relative scale position ``ratio`` in [0, 1] (MaskGIT-style)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)

"""Edit masks for MLN: from cross-attention differences between the source and target prompts, or from the user.

Automatic mask (official code v2, with EditSteer's token choice). One transformer pass per prompt at the mask
scale, on the *source* image's prefix, records each text token's cross-attention map (mean over heads and a band of
blocks). For the tokens that count, ``D = |A_src - A_tgt|``; ``D /= max D``; ``d = mean D``; ``d /= max d``;
``M = 1[d > quantile_q(d)]``.

Which tokens count. The official code compares every position of the source prompt with the same position of the
target prompt, minus a hard-coded stop-word list (``methods.md`` 4.6). EditSteer aligns the two tokenisations
(longest matching blocks, :class:`difflib.SequenceMatcher`) and compares only what the edit changes: replaced
tokens pairwise, deleted source tokens and inserted target tokens against an all-zero map (the official
zero-padding), plus ``neighbours`` aligned tokens on each side of every change (e.g. the noun after a changed
adjective). No word list; identical prompts give an empty mask.

Example::

    from diffusers_ext.mln.masks import changed_token_pairs
    changed_token_pairs([0, 5, 6, 7, 1], [0, 5, 9, 7, 1], neighbours=0)   # [(2, 2)]: position 2 differs
"""

from __future__ import annotations

import difflib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EditSteerConfigError


def _content(ids: list[int], length: int | None) -> list[int]:
    """Positions of content tokens: after the start token, before the end token (``length`` includes both)."""
    n = len(ids) if length is None else int(length)
    return list(range(1, max(1, n - 1)))


def changed_token_pairs(src_ids, tgt_ids, src_len: int | None = None, tgt_len: int | None = None,
                        neighbours: int = 1) -> list[tuple[int | None, int | None]]:
    """Pairs ``(source position, target position)`` of the tokens an edit changes (None: no counterpart).

    ``*_ids`` are full tokenisations (start token first); ``*_len`` the unpadded lengths (start and end
    included; default: the whole list). Positions index the padded sequences (i.e. the text-attention axis).
    """
    src_ids, tgt_ids = [int(i) for i in src_ids], [int(i) for i in tgt_ids]
    sp, tp = _content(src_ids, src_len), _content(tgt_ids, tgt_len)
    a, b = [src_ids[i] for i in sp], [tgt_ids[j] for j in tp]
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    equal_map: dict[int, int] = {}
    pairs: list[tuple[int | None, int | None]] = []
    changed_src: set[int] = set()
    changed_tgt: set[int] = set()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            for k in range(i2 - i1):
                equal_map[i1 + k] = j1 + k
            continue
        n = max(i2 - i1, j2 - j1)
        for k in range(n):
            i = i1 + k if i1 + k < i2 else None
            j = j1 + k if j1 + k < j2 else None
            pairs.append((i, j))
            if i is not None:
                changed_src.add(i)
            if j is not None:
                changed_tgt.add(j)
    # neighbours of every change (done after all opcodes so equal_map is complete)
    if neighbours:
        inv = {j: i for i, j in equal_map.items()}
        extra = set()
        for i in changed_src:
            for d in range(1, neighbours + 1):
                for n_i in (i - d, i + d):
                    if n_i in equal_map:
                        extra.add((n_i, equal_map[n_i]))
        for j in changed_tgt:
            for d in range(1, neighbours + 1):
                for n_j in (j - d, j + d):
                    if n_j in inv:
                        extra.add((inv[n_j], n_j))
        pairs += sorted(extra)
    # back to padded positions
    return [(None if i is None else sp[i], None if j is None else tp[j]) for i, j in pairs]


def attention_difference(maps_src: torch.Tensor, maps_tgt: torch.Tensor,
                         pairs: list[tuple[int | None, int | None]]) -> torch.Tensor:
    """``d`` (N,) in [0, 1]: normalised mean over ``pairs`` of ``|A_src[:, i] - A_tgt[:, j]|``.

    ``maps_*`` are (N, T): N image tokens, T text positions. Missing counterparts compare against zero.
    All zeros when there are no pairs or no difference.
    """
    N = maps_src.shape[0]
    if not pairs:
        return maps_src.new_zeros(N)
    zero = maps_src.new_zeros(N)
    D = torch.stack([(maps_src[:, i] if i is not None else zero) - (maps_tgt[:, j] if j is not None else zero)
                     for i, j in pairs]).abs()
    top = D.max()
    if top <= 0:
        return maps_src.new_zeros(N)
    d = (D / top).mean(0)
    return d / d.max() if d.max() > 0 else d


def quantile_mask(d: torch.Tensor, q: float) -> torch.Tensor:
    """``1[d > quantile_q(d)]`` as float (ties at the quantile are outside); all zeros if ``d`` is constant."""
    if d.numel() == 0 or bool((d == d.flatten()[0]).all()):
        return torch.zeros_like(d)
    thr = torch.quantile(d.float().flatten(), q)
    return (d > thr).to(d.dtype)


def mask_at_scale(mask: torch.Tensor, side: int) -> torch.Tensor:
    """A (B, 1, G, G) mask bilinearly resized to a ``side`` x ``side`` token grid, flattened to (B, side*side)."""
    if mask.shape[-1] != side:
        mask = F.interpolate(mask.float(), size=(side, side), mode="bilinear", align_corners=False)
    return mask.float().flatten(1)


def prepare_user_mask(mask, grid: int, sizes=()) -> torch.Tensor:
    """A user mask (white = edit) as a (1, 1, grid, grid) float tensor in [0, 1].

    Accepted: a PIL image, a numpy array or a tensor of shape (H, W), (1, H, W), (1, 1, H, W) or (H, W, C) with C =
    1, 3 or 4 (colour channels averaged), whose (H, W) is one of ``sizes`` (e.g. the input image's size, the model's
    resolution) or the ``grid`` x ``grid`` token grid; float values in [0, 1], or 0..255 for uint8 / PIL.
    Area-averaged to the grid.
    """
    if mask is None:
        return None
    import PIL.Image

    shape_in = getattr(mask, "shape", None) or getattr(mask, "size", None)
    if isinstance(mask, PIL.Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, np.ndarray):
        m = torch.tensor(mask, dtype=torch.float32) / (255.0 if mask.dtype == np.uint8 else 1.0)
    elif isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu() / (255.0 if mask.dtype == torch.uint8 else 1.0)
    else:
        raise EditSteerConfigError(f"mask must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}")
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4) and m.shape[0] != 1:
        m = m[..., :3].mean(-1)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    allowed = [(grid, grid), *[tuple(int(v) for v in s) for s in sizes]]
    if m.ndim != 2 or tuple(m.shape) not in allowed:
        want = " or ".join(f"{h}x{w}" for h, w in dict.fromkeys(allowed))
        raise EditSteerConfigError(f"mask has shape {tuple(shape_in)}; expected one {want} mask for one image "
                                   "(white = edit), as (H, W), (1, H, W) or (1, 1, H, W)")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise EditSteerConfigError("mask values must lie in [0, 1] (or 0..255 for uint8 / PIL masks)")
    m = m[None, None]
    if tuple(m.shape[-2:]) != (grid, grid):
        m = F.adaptive_avg_pool2d(m, (grid, grid))
    return m

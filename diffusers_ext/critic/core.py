"""The Inline Critic's per-call mathematics, in plain torch, shared by every adapter.

Nothing here knows diffusers or ComfyUI. The diffusers attention processors (``processors_flux.py``,
``processors_qwen.py``) and the ComfyUI patches call these functions with tensors in one documented layout, so one
weight file gives the same predictions through both.

Tensor layout (``BSHD``)
    ``q, k, v`` are the *joint* attention inputs of one block, shape ``(batch, seq, heads, head_dim)``, exactly as
    the frozen model would feed them to its attention kernel: after the q/k RMS norms and after RoPE. The joint
    sequence is ``[text tokens, critic tokens, image tokens]`` (text first, as in Flux and Qwen-Image); the
    ``n_c`` critic rows sit at ``[start, start + n_c)`` where ``start`` is the text length without the critic.
    ``key_mask`` (optional) is a bool ``(batch, seq)`` over that same joint sequence, ``True`` = may be attended
    (Qwen-Image's text padding mask extended with ones); critic rows are always ``True``.

``attn_fn(q, k, v, mask) -> out``
    The adapter's attention kernel on ``BSHD`` tensors. ``mask`` is ``None``, a bool ``(batch, seq_k)`` key mask or
    a float ``(batch | 1, seq_k)`` additive key bias. diffusers passes ``dispatch_attention_fn`` (so the user's
    attention backend is honoured); ComfyUI passes its optimized attention. :func:`sdpa_bshd` is the default.

Block modes (see :meth:`CriticConfig.block_mode`)
    ``dormant``: main tokens attend over the main tokens only (the frozen model's own attention call); the critic
    rows' attention output is zero. ``read``: same main call; the critic queries attend over every main key and
    the critic keys (a second, ``n_c``-query call of ``attn_fn`` on the joint sequence). ``steer``: one attention
    over the whole joint sequence; critic keys get the additive logit bias ``log(scale)`` (``scale == 1``: no
    bias; ``scale == 0``: read). With a ``gate`` (decoupled steering, :func:`critic_steer`), ``steer`` is the
    ``read`` computation plus, for every main row, a separate attention over the critic keys alone times
    ``scale * gate``. Per-block low-rank adapters, when present, act on the critic rows of ``q, k, v`` (post-RoPE)
    first. Steering adapters, when present (``steer`` blocks with ``scale > 0``, :func:`steer_rows`), add low-rank
    corrections to the image rows (every row after the critic) of ``q, k, v`` (post-RoPE) and of the attention
    output, their bottleneck scaled by what the critic holds at this block (:func:`critic_film`).

Example::

    import torch
    from diffusers_ext.critic import core
    q = k = v = torch.randn(1, 10, 2, 8)                 # 4 text rows, 1 critic row, 5 image rows
    out = core.critic_attention(q, k, v, start=4, n_c=1, block_mode="read")
    ref = core.sdpa_bshd(core.drop_rows(q, 4, 1), core.drop_rows(k, 4, 1), core.drop_rows(v, 4, 1), None)
    torch.equal(core.drop_rows(out, 4, 1), ref)          # True: main tokens never see the critic in read mode
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BLOCK_MODES = ("off", "dormant", "read", "steer")


# -- rows ---------------------------------------------------------------------------------------------------------
def take_rows(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows ``[start, start + n)`` of dim 1."""
    return x[:, start:start + n]


def drop_rows(x: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``x`` without rows ``[start, start + n)`` of dim 1 (a copy)."""
    if start + n == x.shape[1]:
        return x[:, :start]
    return torch.cat([x[:, :start], x[:, start + n:]], dim=1)


def insert_rows(main: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """Inverse of :func:`drop_rows`: ``rows`` inserted before position ``start`` of ``main``'s dim 1."""
    return torch.cat([main[:, :start], rows, main[:, start:]], dim=1)


def replace_rows(x: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` with rows ``[start, start + len(rows))`` replaced (out of place, autograd-safe)."""
    n = rows.shape[1]
    return torch.cat([x[:, :start], rows.to(x.dtype), x[:, start + n:]], dim=1)


# -- attention ----------------------------------------------------------------------------------------------------
def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference ``attn_fn``: torch SDPA on ``BSHD`` tensors with a key mask or key bias ``(B|1, S_k)``."""
    m = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m)
    return out.transpose(1, 2)


def lowrank_residual(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x + (x @ down) @ up + bias`` on the flattened heads of ``x`` (``(B, n, H, Dh)``); ``down (H*Dh, r)``,
    ``up (r, H*Dh)``, ``bias (n, H*Dh)``. The critic's per-block adapter; ``up`` and ``bias`` start at zero so a new
    adapter is the identity. The bias gives every block its own learned critic key/value offsets (prefix-tuning
    style capacity); the low-rank term keeps them a function of what the critic has read."""
    b, n, h, d = x.shape
    flat = x.reshape(b, n, h * d)
    delta = (flat.to(down.dtype) @ down) @ up
    if bias is not None:
        delta = delta + bias
    return (flat + delta.to(x.dtype)).reshape(b, n, h, d)


def adapt_critic_rows(qc, kc, vc, adapter: tuple[torch.Tensor, ...] | None):
    """Apply a block's adapter ``(down (3, W, r), up (3, r, W)[, bias (3, n_c, W)])`` to the critic rows of q, k
    and v (index 0, 1, 2)."""
    if adapter is None:
        return qc, kc, vc
    down, up = adapter[0], adapter[1]
    bias = adapter[2] if len(adapter) > 2 else (None, None, None)
    return (lowrank_residual(qc, down[0], up[0], bias[0]), lowrank_residual(kc, down[1], up[1], bias[1]),
            lowrank_residual(vc, down[2], up[2], bias[2]))


def critic_film(vc: torch.Tensor, film: torch.Tensor | None) -> torch.Tensor | None:
    """Per-sample bottleneck scales of a block's steering adapters from the critic's value rows
    ``vc (B, n_c, H, Dh)``: ``1 + LN(vc).flatten() @ film`` with ``film (4, n_c*H*Dh, r)`` -> ``(4, B, r)`` float32
    (``None`` without ``film``: unconditioned adapters). ``film`` starts at zero (scales of one)."""
    if film is None:
        return None
    b, n, h, d = vc.shape
    z = F.layer_norm(vc.float().reshape(b, n, h * d), (h * d,), eps=1e-6).reshape(b, n * h * d)
    return 1 + torch.einsum("bi,pir->pbr", z, film.float())


def steer_rows(x: torch.Tensor, first: int, down: torch.Tensor, up: torch.Tensor, scale: float,
               film: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """``x (B, S, H, Dh)`` with ``scale * ((x @ down) * film) @ up`` added to rows ``[first, S)`` on the flattened
    heads (``down (H*Dh, r)``, ``up (r, H*Dh)``, ``film (B, r)`` or ``None``). Computed in ``x``'s dtype, like a
    LoRA: a float32 copy of every image row would cost more than the adapter itself. ``scale`` and ``film`` act on
    the rank-``r`` bottleneck, not on the full-width product. ``inplace`` adds into ``x`` with one fused
    matrix-product-and-add (no copy of the sequence, no full-width temporary; autograd off only)."""
    rows = x[:, first:]
    b, n, h, d = rows.shape
    z = rows.reshape(b, n, h * d) @ down.to(x.dtype)
    z = z * float(scale) if film is None else z * (film[:, None, :] * float(scale)).to(x.dtype)
    up = up.to(x.dtype)
    if inplace and rows.stride(-1) == 1 and rows.stride(-2) == d:  # the heads flatten into a view of x
        rows.view(b, n, h * d).baddbmm_(z, up.expand(b, *up.shape))
        return x
    delta = (z @ up).reshape(b, n, h, d)
    if inplace:
        rows.add_(delta)
        return x
    return torch.cat([x[:, :first], rows + delta], dim=1)


def critic_steer(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Decoupled steering: every query of ``q (B, S, H, Dh)`` attends over the critic keys ``kc, vc (B, n_c, H, Dh)``
    alone (a softmax of its own, float32) and the result is scaled per head by ``gate (H,)``: ``(B, S, H, Dh)``.

    Added to the frozen model's own attention output, as IP-Adapter adds its image-prompt attention: the frozen
    attention is not renormalised by the critic keys, and a zero gate is exactly the read mode."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.float() * scale, kc.float())
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vc.float())
    return out * gate.float().view(1, 1, -1, 1)


def steer_key_bias(key_mask: torch.Tensor | None, seq: int, start: int, n_c: int, scale: float,
                   batch: int, device, dtype) -> torch.Tensor | None:
    """Key mask/bias for a ``steer`` call over the joint sequence: ``None`` when nothing is masked and
    ``scale == 1``; the bool ``key_mask`` when only padding is masked; else a float bias with ``log(scale)`` on the
    critic keys and ``-inf`` on masked keys."""
    if scale == 1.0:
        return key_mask
    bias = torch.zeros(batch if key_mask is not None else 1, seq, device=device, dtype=dtype)
    bias[:, start:start + n_c] = math.log(scale)
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask, float("-inf"))
    return bias


def critic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, n_c: int,
                     block_mode: str, scale: float = 1.0, key_mask: torch.Tensor | None = None,
                     adapter: tuple[torch.Tensor, ...] | None = None,
                     gate: torch.Tensor | None = None,
                     steer_adapter: tuple[torch.Tensor, ...] | None = None,
                     attn_fn: AttnFn = sdpa_bshd) -> torch.Tensor:
    """One block's attention with the critic rows at ``[start, start + n_c)`` of the joint ``BSHD`` sequence.

    Returns the attention output in the same joint layout (before the output projections). See the module
    docstring for the layout and the block modes. ``steer_adapter`` is ``(down (4, W, r), up (4, r, W)[, film
    (4, n_c*W, r)])`` for the image rows of ``q, k, v`` and the output (index 0-3), used in ``steer`` blocks with
    ``scale > 0`` only.

    In ``read`` and ``dormant`` blocks the main tokens run the frozen model's own attention call on the main rows in
    their own order, so the frozen output is reproduced bit for bit, in every dtype.

    With autograd off, ``q``, ``k`` and ``v`` are used as scratch space (the critic rows and, in steer blocks, the
    image rows are rewritten in place): callers must not reuse them after the call. With autograd on, nothing is
    modified in place.
    """
    if block_mode == "off":
        return attn_fn(q, k, v, key_mask)
    if block_mode not in BLOCK_MODES:
        raise ValueError(f"unknown block mode {block_mode!r}")
    if block_mode == "steer" and scale > 0 and steer_adapter is not None:
        down, up = steer_adapter[0], steer_adapter[1]
        film = critic_film(take_rows(v, start, n_c), steer_adapter[2] if len(steer_adapter) > 2 else None)
        films = [None] * 4 if film is None else list(film)
        first, inplace = start + n_c, not torch.is_grad_enabled()
        q, k, v = (steer_rows(x, first, down[i], up[i], scale, films[i], inplace) for i, x in enumerate((q, k, v)))
        out = critic_attention(q, k, v, start=start, n_c=n_c, block_mode=block_mode, scale=scale,
                               key_mask=key_mask, adapter=adapter, gate=gate, attn_fn=attn_fn)
        return steer_rows(out, first, down[3], up[3], scale, films[3], inplace)
    inplace = not torch.is_grad_enabled()
    qc, kc, vc = take_rows(q, start, n_c), take_rows(k, start, n_c), take_rows(v, start, n_c)
    if block_mode != "dormant":
        qc, kc, vc = adapt_critic_rows(qc, kc, vc, adapter)
    extra = None
    if block_mode == "steer" and scale > 0 and gate is not None:
        # decoupled steering: the frozen attention as in read mode (below) plus the gated critic-only attention of
        # every main row; computed first, because the read path may use q as scratch space
        extra = critic_steer(q, kc, vc, gate * float(scale))
    elif block_mode == "steer" and scale > 0:
        if adapter is not None:
            if inplace:
                for x, r in ((q, qc), (k, kc), (v, vc)):
                    x[:, start:start + n_c] = r
            else:
                q, k, v = replace_rows(q, qc, start), replace_rows(k, kc, start), replace_rows(v, vc, start)
        mask = steer_key_bias(key_mask, q.shape[1], start, n_c, float(scale), q.shape[0], q.device, q.dtype)
        return attn_fn(q, k, v, mask)
    # read / dormant / decoupled steer (and steer with scale 0): the main tokens run the frozen model's own call, on
    # the main rows in their own order. (Moving the critic rows to the end instead would save the copies, but the
    # kernel would then sum the keys in another order: 7.8e-3 off the frozen output in bf16 after one forward.)
    qm, km, vm = drop_rows(q, start, n_c), drop_rows(k, start, n_c), drop_rows(v, start, n_c)
    mm = None if key_mask is None else drop_rows(key_mask, start, n_c)
    out_main = attn_fn(qm, km, vm, mm)
    if block_mode == "dormant":
        out_c = torch.zeros_like(qc, dtype=out_main.dtype)
    else:
        # the critic's read: its n_c queries over every key, main and (adapted) critic, through the same kernel on
        # the joint sequence (key order does not matter to a softmax). A float32 attention of its own would copy
        # the keys and values of the whole sequence to float32 in every block: on a GPU that cost more than the
        # rest of the critic (README, Inline Critic, "Cost").
        if inplace:
            k[:, start:start + n_c], v[:, start:start + n_c] = kc, vc
        else:
            k, v = replace_rows(k, kc, start), replace_rows(v, vc, start)
        out_c = attn_fn(qc, k, v, key_mask).to(out_main.dtype)
    out = insert_rows(out_main, out_c, start)
    if extra is not None:  # the critic rows only read
        out = out + replace_rows(extra, torch.zeros_like(take_rows(extra, start, n_c)), start).to(out.dtype)
    return out


# -- error maps ---------------------------------------------------------------------------------------------------
def token_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token squared error ``||pred_i - target_i||^2`` over the channel dim: ``(B, N, C) -> (B, N)``."""
    return (pred.float() - target.float()).pow(2).sum(-1)


def log_normalise(err: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``log(1 + e)`` divided by its per-sample mean over tokens (``methods.md`` §1.4): a few huge-error tokens
    cannot dominate, and maps of easy and hard samples share one scale (mean 1)."""
    le = torch.log1p(err.float().clamp_min(0))
    return le / (le.mean(dim=-1, keepdim=True) + eps)


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (0-based, float), ties get their average rank (as ``scipy.stats.rankdata``)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat, dtype=torch.float64)
    for i, row in enumerate(flat):
        vals, order = torch.sort(row)
        r = torch.empty_like(row, dtype=torch.float64)
        r[order] = torch.arange(row.numel(), dtype=torch.float64)
        uniq, inverse, counts = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
        if uniq.numel() < row.numel():  # average the ranks of tied values
            ends = torch.cumsum(counts, 0).double()
            avg = ends - (counts.double() + 1) / 2
            r[order] = avg[inverse]
        out[i] = r
    return out.reshape(x.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim: ``(..., N), (..., N) -> (...)``. NaN where a map is constant."""
    ra, rb = rank(a), rank(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.pow(2).sum(-1).sqrt() * rb.pow(2).sum(-1).sqrt())


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching velocity target ``v* = noise - x0`` (``x_t = (1 - sigma) x0 + sigma noise``)."""
    return noise - x0


def flow_matching_loss(v_hat: torch.Tensor, v_star: torch.Tensor, edit_tokens: torch.Tensor | None = None,
                       edit_weight: float = 0.0) -> torch.Tensor:
    """Flow-matching MSE (mean over channels, then tokens) in float32. With ``edit_tokens (B, N)`` and
    ``edit_weight > 0``, edit tokens weigh ``1 + edit_weight``: the stage-3 loss of ``editsteer train critic``,
    and the loss of the headroom reference, which must train on the very same objective."""
    err = (v_hat.float() - v_star.float()).pow(2).mean(-1)  # (B, tokens)
    if edit_weight and edit_tokens is not None:
        w = 1.0 + edit_weight * edit_tokens.to(err)
        return (err * w).sum() / w.sum()
    return err.mean()


def fm_sums(v: torch.Tensor, v_star: torch.Tensor,
            edit_tokens: torch.Tensor | None = None) -> tuple[float, float | None]:
    """Flow-matching MSE of one batch, and the same over the edit tokens only (``None`` without a mask): the
    validation numbers (``fm``, ``fm_edit``) of the critic trainer and of the headroom reference."""
    err = (v.float() - v_star.float()).pow(2).mean(-1)  # (B, tokens)
    if edit_tokens is None:
        return float(err.mean()), None
    m = edit_tokens.float()
    return float(err.mean()), float((err * m).sum() / m.sum().clamp_min(1))

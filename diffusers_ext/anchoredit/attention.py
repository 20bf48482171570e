"""AnchorEdit's extension of diffusers' ``WanTransformer3DModel``: attention processors and hooks, no forked model.

Once :func:`~diffusers_ext.anchoredit.apply_anchoredit` is applied, the latent frames of ``hidden_states``
``[B, C, F, H, W]`` are editing *turns* (frame 0 is the source image, frame ``i`` the result of edit ``i``):

* **self-attention is frame-causal** (:class:`AnchorEditSelfAttnProcessor`): frame ``i`` attends to the sink frames,
  the last ``window`` turns and itself (``AnchorEditConfig.visible_frames``). With a
  :class:`~diffusers_ext.anchoredit.cache.AnchorKVCache` one frame is processed per call against the cached keys and
  values; without a cache the whole sequence is processed at once (training);
* **cross-attention is per frame** (:class:`AnchorEditCrossAttnProcessor`): with ``encoder_hidden_states`` of shape
  ``[B, F, L, D]`` frame ``i`` attends only to its own instruction ``[:, i]`` (the stock processor, run per frame);
* **temporal RoPE is strided** (:class:`RopeHook`): frame ``i`` (absolute, counting cached frames) gets temporal
  position ``i * rope_stride``;
* **timesteps are per frame** (:class:`TransformerHook`): ``timestep`` of shape ``[B, F]`` is expanded to the
  per-token timesteps Wan 2.2 already supports.

The per-call state (frame count, cache, write flag) travels with the rotary embedding tuple into every block, so it
is also right when gradient checkpointing recomputes a block during the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..errors import EditSteerConfigError, EditSteerError
from .cache import AnchorKVCache
from .config import AnchorEditConfig

#: keys of ``attention_kwargs`` that AnchorEdit reads (and removes) in the transformer's forward
CACHE_KWARG = "anchoredit_cache"
WRITE_KWARG = "anchoredit_write"

_FORWARD_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image", "return_dict",
                 "attention_kwargs")


@dataclass(frozen=True)
class CallState:
    """What one transformer call processes: ``num_frames`` frames of ``tokens_per_frame`` tokens starting at
    absolute frame ``start_frame``; ``context_len`` tokens of instruction per frame (None: one shared context)."""

    num_frames: int
    tokens_per_frame: int
    grid: tuple[int, int, int]  # post-patch (frames, height, width)
    start_frame: int
    context_len: int | None
    cache: AnchorKVCache | None
    write: bool


class RotaryWithState(tuple):
    """``(freqs_cos, freqs_sin)`` as Wan's blocks expect, carrying the :class:`CallState` of the call."""

    anchoredit_call: CallState

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor, call: CallState):
        obj = super().__new__(cls, (cos, sin))
        obj.anchoredit_call = call
        return obj


class AnchorEditRuntime:
    """State shared by the hooks and processors installed on one transformer by ``apply_anchoredit``."""

    def __init__(self, config: AnchorEditConfig, num_layers: int, patch_size, rope_max_seq_len: int):
        self.config = config
        self.num_layers = num_layers
        self.patch_size = tuple(patch_size)
        self.rope_max_seq_len = rope_max_seq_len
        self.pending: CallState | None = None  # set by the transformer hook, read by the rope hook
        self.active: CallState | None = None  # set by each block's self-attention, read by its cross-attention
        self.original_processors: dict[str, object] = {}
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def new_cache(self) -> AnchorKVCache:
        """An empty KV cache for one session of this transformer."""
        return AnchorKVCache(self.config, self.num_layers)

    def causal_mask(self, num_frames: int, tokens: int, device) -> torch.Tensor:
        """Boolean ``[F*n, F*n]`` mask, True where a query token may attend a key token."""
        key = (num_frames, tokens, str(device))
        m = self._mask_cache.get(key)
        if m is None:
            vis = torch.zeros(num_frames, num_frames, dtype=torch.bool)
            for i in range(num_frames):
                vis[i, self.config.visible_frames(i)] = True
            m = vis.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1).to(device)
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            self._mask_cache[key] = m
        return m


# --------------------------------------------------------------------------------------------------------------
# hooks


class TransformerHook(ModelHook):
    """Reads the frame layout of each call, expands per-frame timesteps, flattens per-frame instructions, and
    commits the written frame to the cache after the forward pass."""

    def __init__(self, runtime: AnchorEditRuntime):
        super().__init__()
        self.runtime = runtime

    def pre_forward(self, module, *args, **kwargs):
        rt = self.runtime
        if len(args) > len(_FORWARD_ARGS):
            raise TypeError(f"too many positional arguments for {type(module).__name__}.forward")
        bound = dict(zip(_FORWARD_ARGS, args))
        dup = set(bound) & set(kwargs)
        if dup:
            raise TypeError(f"got multiple values for {sorted(dup)}")
        bound.update(kwargs)
        hs = bound["hidden_states"]
        if hs.ndim != 5:
            raise EditSteerConfigError(f"hidden_states must be [B, C, F, H, W] latents, got shape {tuple(hs.shape)}")
        b, _, f, h, w = hs.shape
        _, p_h, p_w = rt.patch_size
        if h % p_h or w % p_w:
            raise EditSteerConfigError(
                f"latents of {h}x{w} do not fit the transformer's {p_h}x{p_w} patch grid; use an image whose sides "
                f"are multiples of {p_h} x the VAE's spatial factor")
        n = (h // p_h) * (w // p_w)

        akw = dict(bound.get("attention_kwargs") or {})
        cache = akw.pop(CACHE_KWARG, None)
        write = bool(akw.pop(WRITE_KWARG, False))
        bound["attention_kwargs"] = akw or None
        if write and cache is None:
            raise EditSteerConfigError(f"{WRITE_KWARG}=True needs a {CACHE_KWARG}")
        if cache is not None:
            if not isinstance(cache, AnchorKVCache):
                raise EditSteerConfigError(f"{CACHE_KWARG} must be an AnchorKVCache, got {type(cache).__name__}")
            if f != 1:
                raise EditSteerConfigError(f"a cached (incremental) call processes one frame (turn); got {f} frames")
            if cache.num_layers != rt.num_layers:
                raise EditSteerConfigError(f"this cache was made for {cache.num_layers} layers, the transformer has "
                                           f"{rt.num_layers}; create it with runtime.new_cache()")
        start = cache.next_frame if cache is not None else 0
        last = start + f - 1
        if last > rt.config.max_turns:
            raise EditSteerConfigError(
                f"frame {last} (turn {last}) exceeds max_turns={rt.config.max_turns} of this AnchorEditConfig; "
                "start a new session from the current image, or configure a larger max_turns")

        t = bound["timestep"]
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=hs.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 2:
            if t.shape[1] == 1 or (t.shape[1] == f and bool((t == t[:, :1]).all())):
                t = t[:, 0]  # one timestep for the whole call: the stock path
            elif t.shape[1] == f:
                t = t.repeat_interleave(n, dim=1)  # per frame -> per token (Wan 2.2 path)
            elif t.shape[1] != f * n:
                raise EditSteerConfigError(f"timestep must be [B], [B, F] or [B, F*tokens]; got {tuple(t.shape)} "
                                           f"for {f} frames of {n} tokens")
        bound["timestep"] = t

        ehs = bound["encoder_hidden_states"]
        context_len = None
        if ehs is not None and ehs.ndim == 4:
            if ehs.shape[1] != f:
                raise EditSteerConfigError(f"encoder_hidden_states [B, F, L, D] has {ehs.shape[1]} instructions for "
                                           f"{f} frames; give one instruction per frame")
            context_len = ehs.shape[2]
            bound["encoder_hidden_states"] = ehs.flatten(1, 2) if f > 1 else ehs[:, 0]
            if f == 1:
                context_len = None
        if bound.get("encoder_hidden_states_image") is not None:
            raise EditSteerConfigError("AnchorEdit runs text-to-video Wan transformers; image embeddings (I2V) are "
                                       "not supported")
        rt.pending = CallState(num_frames=f, tokens_per_frame=n, grid=(f, h // p_h, w // p_w), start_frame=start,
                               context_len=context_len, cache=cache, write=write)
        return (), bound

    def post_forward(self, module, output):
        call = self.runtime.pending
        if call is not None and call.write:
            call.cache.commit()
        self.runtime.pending = None
        return output


class RopeHook(ModelHook):
    """Replaces ``WanRotaryPosEmbed.forward``: temporal position of frame ``i`` is ``(start_frame + i) * stride``."""

    def __init__(self, runtime: AnchorEditRuntime):
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module, hidden_states: torch.Tensor):
        rt = self.runtime
        call = rt.pending
        if call is None:  # called on its own (not from the transformer): plain positions, no state
            return self.fn_ref.original_forward(hidden_states)
        ppf, pph, ppw = call.grid
        pos = (torch.arange(ppf) + call.start_frame) * rt.config.rope_stride
        if int(pos.max()) >= module.max_seq_len:
            raise EditSteerConfigError(f"temporal RoPE position {int(pos.max())} exceeds the table "
                                       f"({module.max_seq_len}); lower max_turns or rope_stride")
        pos = pos.to(module.freqs_cos.device)
        split = [module.t_dim, module.h_dim, module.w_dim]
        out = []
        for table in (module.freqs_cos, module.freqs_sin):
            ft, fh, fw = table.split(split, dim=1)
            full = torch.cat([
                ft[pos].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                fh[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                fw[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
            ], dim=-1)
            out.append(full.reshape(1, ppf * pph * ppw, 1, -1))
        return RotaryWithState(out[0], out[1], call)


# --------------------------------------------------------------------------------------------------------------
# processors


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (identical to the stock processor's)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def _qkv(attn, hidden_states: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class AnchorEditSelfAttnProcessor:
    """Frame-causal self-attention with the anchored KV cache (replaces ``WanAttnProcessor`` on ``attn1``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, runtime: AnchorEditRuntime, layer: int):
        self.runtime = runtime
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        call = getattr(rotary_emb, "anchoredit_call", None)
        if call is None:
            raise EditSteerError("AnchorEdit's self-attention ran outside an AnchorEdit transformer call "
                                 "(no frame layout); call the transformer itself, or remove_anchoredit() first")
        if attention_mask is not None:
            raise EditSteerConfigError("AnchorEdit builds its own frame-causal mask; attention_mask must be None")
        self.runtime.active = call

        q, k, v = _qkv(attn, hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q = _apply_rotary(q, *rotary_emb)
        k = _apply_rotary(k, *rotary_emb)

        if call.cache is not None:
            keys, values = call.cache.stage(self.layer, k, v)
            out = dispatch_attention_fn(q, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend)
        else:
            out = self._frame_causal(q, k, v, call)
        out = out.flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _frame_causal(self, q, k, v, call: CallState) -> torch.Tensor:
        f, n = call.num_frames, call.tokens_per_frame
        cfg = self.runtime.config
        if f == 1:
            return dispatch_attention_fn(q, k, v, attn_mask=None, backend=self._attention_backend)
        mode = cfg.causal_attention
        if mode == "auto":
            mode = "mask" if f * n <= 4096 and self._attention_backend is None else "loop"
        if mode == "mask":
            mask = self.runtime.causal_mask(f, n, q.device)
            return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend)
        outs = []
        for i in range(f):
            vis = cfg.visible_frames(i)
            idx = _frame_slices(vis, n)
            ki = torch.cat([k[:, a:b] for a, b in idx], 1) if len(idx) > 1 else k[:, idx[0][0]:idx[0][1]]
            vi = torch.cat([v[:, a:b] for a, b in idx], 1) if len(idx) > 1 else v[:, idx[0][0]:idx[0][1]]
            outs.append(dispatch_attention_fn(q[:, i * n:(i + 1) * n], ki, vi, attn_mask=None,
                                              backend=self._attention_backend))
        return torch.cat(outs, 1)


def _frame_slices(frames: list[int], n: int) -> list[tuple[int, int]]:
    """Token ranges of a sorted list of frames, merged where contiguous."""
    out: list[list[int]] = []
    for fr in frames:
        if out and out[-1][1] == fr * n:
            out[-1][1] = (fr + 1) * n
        else:
            out.append([fr * n, (fr + 1) * n])
    return [tuple(x) for x in out]


class AnchorEditCrossAttnProcessor:
    """Per-frame cross-attention: each frame attends only to its own instruction (wraps the stock processor)."""

    def __init__(self, runtime: AnchorEditRuntime, base):
        self.runtime = runtime
        self.base = base

    @property
    def _attention_backend(self):
        return getattr(self.base, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.base._attention_backend = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        call = self.runtime.active
        if call is None or call.context_len is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        b = hidden_states.shape[0]
        f, n, l = call.num_frames, call.tokens_per_frame, call.context_len
        hs = hidden_states.reshape(b * f, n, hidden_states.shape[-1])
        ctx = encoder_hidden_states.reshape(b * f, l, encoder_hidden_states.shape[-1])
        out = self.base(attn, hs, ctx, attention_mask, rotary_emb)
        return out.reshape(b, f * n, out.shape[-1])


__all__ = ["AnchorEditCrossAttnProcessor", "AnchorEditRuntime", "AnchorEditSelfAttnProcessor", "CACHE_KWARG",
           "CallState", "RopeHook", "RotaryWithState", "TransformerHook", "WRITE_KWARG"]

"""Inline Critic adapter for diffusers' ``FluxTransformer2DModel`` (FLUX.1 Kontext [dev] and the toy editor).

Placement: the ``n_c`` critic rows ride at the end of the text stream. The transformer pre-hook appends zero rows to
``encoder_hidden_states`` (before ``context_embedder``) and RoPE ids ``(3, 0, 0)`` to ``txt_ids`` (image ids with
axis 0 = 3 are refused); single-stream blocks carry the rows automatically (they split at the text length); Flux
drops the text stream before ``proj_out``, so the output shape is unchanged. The processor below is a thin caller of
:meth:`InlineCritic.attention`: it computes q/k/v exactly as ``FluxAttnProcessor`` does and hands the joint,
RoPE'd sequence to the core.
"""

from __future__ import annotations

import torch

from ..errors import EditSteerConfigError
from .config import FLUX_CRITIC_ROPE_ID
from .runtime import BoundArgs, CallState, CriticProcessorBase, CriticRuntime

ARCH = "flux"


def _stock_processor_classes():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return (FluxAttnProcessor,)


def matches(transformer) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(transformer, FluxTransformer2DModel)


def describe(transformer) -> dict:
    cfg = transformer.config
    return {"arch": ARCH, "class": type(transformer).__name__, "width": int(transformer.inner_dim),
            "num_heads": int(cfg.num_attention_heads), "num_double": len(transformer.transformer_blocks),
            "depth": len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks),
            "context_dim": int(cfg.joint_attention_dim), "out_dim": int(transformer.proj_out.out_features)}


def blocks(transformer) -> list[torch.nn.Module]:
    """Blocks in global order: double-stream blocks, then single-stream blocks."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def target_info(img_ids: torch.Tensor) -> tuple[int, tuple[int, int] | None]:
    """Target tokens (RoPE id axis 0 == 0; Kontext references have 1) and their (h, w) grid."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.device.type == "meta":  # shape-only runs (FLOP counting): treat every image token as a target
        return ids.shape[0], None
    tgt = ids[:, 0] == 0
    n = int(tgt.sum())
    if n == 0:
        return ids.shape[0], None
    t = ids[tgt]
    h, w = int(t[:, 1].max() - t[:, 1].min()) + 1, int(t[:, 2].max() - t[:, 2].min()) + 1
    return n, ((h, w) if h * w == n else None)


def check_rope_ids(img_ids: torch.Tensor) -> None:
    """Refuse image tokens whose RoPE id shares axis 0 with the critic's (:data:`FLUX_CRITIC_ROPE_ID`, fixed by
    training): the critic would be read as part of that image. Kontext gives its targets 0 and its references 1;
    ComfyUI's ``ref_latents_method="index"`` numbers references 1, 2, 3, ... (its guard is in ``critic_patch.py``)."""
    if img_ids.device.type == "meta":
        return
    if bool((img_ids[..., 0] == FLUX_CRITIC_ROPE_ID[0]).any()):
        raise EditSteerConfigError(
            f"img_ids give image tokens RoPE index {FLUX_CRITIC_ROPE_ID[0]} on axis 0, the Inline Critic's own (its "
            f"tokens sit at {FLUX_CRITIC_ROPE_ID}, fixed by training); number reference images 1 (Kontext) or 1 and "
            "2 only")


def prepare_call(runtime: CriticRuntime, module, args, kwargs):
    """Transformer forward pre-hook: append the critic rows and their RoPE ids; set the call state."""
    b = BoundArgs(module, args, kwargs)
    if runtime.mode == "off":
        runtime.call = CallState(active=False)
        return None
    n_c = runtime.critic.config.n_tokens
    ehs, txt_ids, img_ids = b.get("encoder_hidden_states"), b.get("txt_ids"), b.get("img_ids")
    if ehs is None or txt_ids is None or img_ids is None:
        raise EditSteerConfigError("Inline Critic on Flux needs encoder_hidden_states, txt_ids and img_ids")
    hs = b.get("hidden_states")
    runtime.sync_device(hs.device)
    zeros = ehs.new_zeros(ehs.shape[0], n_c, ehs.shape[-1])
    b.set("encoder_hidden_states", torch.cat([ehs, zeros], dim=1))
    rid = txt_ids.new_tensor(FLUX_CRITIC_ROPE_ID).expand(n_c, 3)
    if txt_ids.ndim == 3:  # deprecated batched ids
        rid = rid.unsqueeze(0).expand(txt_ids.shape[0], -1, -1)
    b.set("txt_ids", torch.cat([txt_ids, rid], dim=-2))
    check_rope_ids(img_ids)
    n_target, grid = target_info(img_ids)
    t = b.get("timestep")
    runtime.call = CallState(active=True, mode=runtime.mode, scale=runtime.scale, n_txt=ehs.shape[1],
                             n_target=n_target, grid=grid,
                             timestep=_timestep(t))
    return b.unbind()


def _timestep(t):
    if torch.is_tensor(t):
        return None if t.device.type == "meta" else float(t.flatten()[0])
    return t


def block_outputs(output) -> tuple[torch.Tensor, torch.Tensor]:
    """(text stream, image stream) of a block's output."""
    txt, img = output
    return txt, img


def _qkv(attn, hidden_states, encoder_hidden_states):
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq = ek = ev = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return q, k, v, eq, ek, ev
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    return q, k, v, eq, ek, ev


class FluxCriticAttnProcessor(CriticProcessorBase):
    """Attention processor for one Flux block (double- or single-stream) with an Inline Critic installed."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        call = self.runtime.call
        if call is None or not call.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise EditSteerConfigError("the Inline Critic does not support an explicit attention_mask on Flux")
        from diffusers.models.embeddings import apply_rotary_emb

        q, k, v, eq, ek, ev = _qkv(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.runtime.critic.attention(self.block_index, q, k, v, start=call.n_txt, mode=call.mode,
                                            scale=call.scale, attn_fn=self._attn)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            txt, img = out.split_with_sizes([encoder_hidden_states.shape[1],
                                             out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            txt = attn.to_add_out(txt.contiguous())
            return img, txt
        return out

"""Inline Critic adapter for diffusers' ``QwenImageTransformer2DModel`` (Qwen-Image-Edit).

Placement: the ``n_c`` critic rows ride at the end of the text stream. The transformer pre-hook appends zero rows to
``encoder_hidden_states`` (conditioning space, before ``txt_norm``/``txt_in``) and ones to
``encoder_hidden_states_mask``. Their RoPE positions are the ones right after each sample's own, unpadded prompt
(``QwenEmbedRope``'s text rows ``L_i .. L_i + n_c - 1``, ``L_i`` = the sample's last unmasked text token + 1): the
text positions they would take if the prompt were not padded. A sample's critic therefore does not depend on how
long its batch neighbours' prompts are (``QwenImageEditPipeline`` pads every prompt to the longest), and matches
ComfyUI, which never pads. The processor computes q/k/v exactly as ``QwenDoubleStreamAttnProcessor2_0`` does, gives
the critic rows of padded samples their own positions, and hands the joint, RoPE'd sequence to
:meth:`InlineCritic.attention`.
"""

from __future__ import annotations

import torch

from ..errors import EditSteerConfigError
from . import core
from .runtime import BoundArgs, CallState, CriticProcessorBase, CriticRuntime

ARCH = "qwen-image"


def _stock_processor_classes():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    return (QwenDoubleStreamAttnProcessor2_0,)


def matches(transformer) -> bool:
    from diffusers import QwenImageTransformer2DModel

    return isinstance(transformer, QwenImageTransformer2DModel)


def describe(transformer) -> dict:
    cfg = transformer.config
    return {"arch": ARCH, "class": type(transformer).__name__, "width": int(transformer.inner_dim),
            "num_heads": int(cfg.num_attention_heads), "num_double": None,
            "depth": len(transformer.transformer_blocks), "context_dim": int(cfg.joint_attention_dim),
            "out_dim": int(transformer.proj_out.out_features)}


def blocks(transformer) -> list[torch.nn.Module]:
    return list(transformer.transformer_blocks)


def target_info(img_shapes) -> tuple[int | None, tuple[int, int] | None]:
    """Target tokens = the first (frame, h, w) entry of the first sample's ``img_shapes``."""
    shapes = img_shapes[0] if isinstance(img_shapes, (list, tuple)) and img_shapes else img_shapes
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
        shapes = shapes[0]
    f, h, w = (int(x) for x in shapes)
    return f * h * w, ((h, w) if f == 1 else None)


def prepare_call(runtime: CriticRuntime, module, args, kwargs):
    """Transformer forward pre-hook: append the critic rows (and mask ones); set the call state."""
    b = BoundArgs(module, args, kwargs)
    if runtime.mode == "off":
        runtime.call = CallState(active=False)
        return None
    n_c = runtime.critic.config.n_tokens
    ehs, mask = b.get("encoder_hidden_states"), b.get("encoder_hidden_states_mask")
    img_shapes = b.get("img_shapes")
    if ehs is None or img_shapes is None:
        raise EditSteerConfigError("Inline Critic on Qwen-Image needs encoder_hidden_states and img_shapes")
    runtime.sync_device(b.get("hidden_states").device)
    b.set("encoder_hidden_states", torch.cat([ehs, ehs.new_zeros(ehs.shape[0], n_c, ehs.shape[-1])], dim=1))
    if mask is not None:
        b.set("encoder_hidden_states_mask", torch.cat([mask, mask.new_ones(mask.shape[0], n_c)], dim=1))
    n_target, grid = target_info(img_shapes)
    t = b.get("timestep")
    runtime.call = CallState(active=True, mode=runtime.mode, scale=runtime.scale, n_txt=ehs.shape[1],
                             n_target=n_target, grid=grid,
                             timestep=_timestep(t), critic_pos=critic_positions(mask))
    return b.unbind()


def critic_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-sample text RoPE row of the first critic token: the sample's unpadded prompt length (its last unmasked
    text token + 1; the whole length when nothing is unmasked). ``None`` without a mask: nothing is padded and the
    rows keep the positions the transformer gives them (the same ones). No host sync."""
    if mask is None or mask.device.type == "meta":
        return None
    m = mask.to(torch.bool)
    n = m.shape[1]
    idx = torch.arange(1, n + 1, device=m.device)
    return torch.where(m.any(1), (m * idx).amax(1), torch.full_like(idx[:1], n))


def rope_critic_rows(x: torch.Tensor, raw: torch.Tensor, txt_freqs: torch.Tensor, start: int, n_c: int,
                     pos: torch.Tensor) -> torch.Tensor:
    """``x`` (text q or k after RoPE, ``(B, S_txt, H, D)``) with its critic rows ``[start, start + n_c)`` RoPE'd
    from ``raw`` (the same before RoPE) at text rows ``pos[b] + j`` of ``txt_freqs`` (complex, ``(S_txt, D/2)``),
    by diffusers' own ``apply_rotary_emb_qwen``, one sample at a time (its frequencies broadcast over the batch)."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    rows = raw[:, start:start + n_c]
    f = txt_freqs[pos[:, None].to(txt_freqs.device) + torch.arange(n_c, device=txt_freqs.device)]  # (B, n_c, D/2)
    rotated = torch.cat([apply_rotary_emb_qwen(rows[i:i + 1], f[i], use_real=False) for i in range(rows.shape[0])])
    return core.replace_rows(x, rotated, start)


def _timestep(t):
    if torch.is_tensor(t):
        return None if t.device.type == "meta" else float(t.flatten()[0])
    return t


def block_outputs(output) -> tuple[torch.Tensor, torch.Tensor]:
    txt, img = output
    return txt, img


class QwenCriticAttnProcessor(CriticProcessorBase):
    """Attention processor for one Qwen-Image block with an Inline Critic installed (delegates when off)."""

    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 encoder_hidden_states_mask: torch.FloatTensor = None, attention_mask=None,
                 image_rotary_emb=None) -> torch.FloatTensor:
        call = self.runtime.call
        if call is None or not call.active:
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or attention_mask is not None:
            raise EditSteerConfigError("Qwen-Image attention needs encoder_hidden_states and no external "
                                       "attention_mask")
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        key_mask = None
        if encoder_hidden_states_mask is not None:
            img_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            key_mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), img_mask], dim=1)
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        iq, ik, iv = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        tq = attn.add_q_proj(encoder_hidden_states)
        tk = attn.add_k_proj(encoder_hidden_states)
        tv = attn.add_v_proj(encoder_hidden_states)
        iq, ik, iv, tq, tk, tv = (t.unflatten(-1, (-1, head_dim)) for t in (iq, ik, iv, tq, tk, tv))
        if attn.norm_q is not None:
            iq = attn.norm_q(iq)
        if attn.norm_k is not None:
            ik = attn.norm_k(ik)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            iq = apply_rotary_emb_qwen(iq, img_freqs, use_real=False)
            ik = apply_rotary_emb_qwen(ik, img_freqs, use_real=False)
            tq_raw, tk_raw = tq, tk
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
            if call.critic_pos is not None:  # padded samples: the critic rows right after their own prompt
                n_c = self.runtime.critic.config.n_tokens
                tq = rope_critic_rows(tq, tq_raw, txt_freqs, call.n_txt, n_c, call.critic_pos)
                tk = rope_critic_rows(tk, tk_raw, txt_freqs, call.n_txt, n_c, call.critic_pos)
        q, k, v = torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1), torch.cat([tv, iv], dim=1)
        out = self.runtime.critic.attention(self.block_index, q, k, v, start=call.n_txt, mode=call.mode,
                                            scale=call.scale, key_mask=key_mask, attn_fn=self._attn)
        out = out.flatten(2, 3).to(q.dtype)
        txt, img = out[:, :seq_txt, :], out[:, seq_txt:, :]
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        txt = attn.to_add_out(txt.contiguous())
        return img, txt


"""The attention-based editing activation map, captured with hooks during the k early steps (no extra NFE).

For each chosen double-stream block of a Flux/Kontext or Qwen-Image transformer, the map is the attention that
instruction (text) tokens pay to each image token: softmax over all keys of q_text . k / sqrt(d), averaged over heads
and (valid) text tokens, summed over blocks and early steps. Only the conditional pass of each step is used.

No processor is replaced, so the capture stacks with any processor already installed (the Inline Critic's
included): forward hooks read the post-norm queries/keys (``attn.norm_q``, ``norm_k``, ``norm_added_q``,
``norm_added_k``) and a pre-hook on the attention module reads the rotary embedding and text mask; the probabilities
are recomputed from those (RoPE applied with diffusers' own functions). The output of the model is untouched.
The hooks run inside the transformer's forward; the time they take is kept in ``seconds`` so that it is reported as
verifier time, not model time.

Example::

    cap = AttentionCapture(layers=None)          # all double-stream blocks
    cap.install(pipe.transformer, state)         # state: anything with a ``handles`` list, removed on exit
    cap.start(batch=4)                           # then run the k early steps, calling cap.on_forward(...)
    maps = cap.result()                          # [4, L_image] (target tokens first)
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import EditSteerConfigError


def double_stream_attentions(transformer) -> list:
    """The attention modules of the transformer's double-stream (text + image) blocks, in order."""
    blocks = getattr(transformer, "transformer_blocks", None) or []
    out = []
    for b in blocks:
        attn = getattr(b, "attn", None)
        if attn is not None and all(getattr(attn, n, None) is not None
                                    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
            out.append(attn)
    return out


class AttentionCapture:
    """Accumulates text -> image attention over the conditional pass of each early step (see module docstring)."""

    def __init__(self, layers: tuple[int, ...] | None = None):
        self.layers = layers
        self.active = False
        self.limit_steps: int | None = None
        self.steps = 0
        self.acc: torch.Tensor | None = None
        self._cur: dict = {}
        self.text_rows: int | None = None
        self.seconds = 0.0  # time spent in the hooks (inside model calls)

    # -- installation ----------------------------------------------------------------------------------------------
    def install(self, transformer, state) -> None:
        attns = double_stream_attentions(transformer)
        if not attns:
            raise EditSteerConfigError(
                f"{type(transformer).__name__} has no double-stream attention blocks with QK norms: the attention map "
                "cannot be captured; use VeriLatentConfig(activation='latent')")
        idx = range(len(attns)) if self.layers is None else self.layers
        bad = [i for i in idx if i >= len(attns)]
        if bad:
            raise EditSteerConfigError(
                f"attention_layers {bad} out of range: the transformer has {len(attns)} double-stream blocks")
        for i in idx:
            a = attns[i]
            state.handles.append(a.register_forward_pre_hook(self._pre_attn, with_kwargs=True))
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                state.handles.append(getattr(a, name).register_forward_hook(self._grab(name)))
            state.handles.append(a.register_forward_hook(self._post_attn))

    # -- control ---------------------------------------------------------------------------------------------------
    def start(self, batch: int, steps: int | None = None) -> None:
        self.acc, self.steps, self.limit_steps, self.active = None, 0, steps, False

    def stop(self) -> None:
        self.active, self.limit_steps = False, 0

    def on_forward(self, step_calls: int, text_rows: int | None = None) -> None:
        """Called before every transformer pass with the pass's index within its step (1 = conditional pass) and
        the number of the pipeline's own text tokens (rows other hooks append after them, e.g. the Inline Critic's,
        are left out of the map; ``None``: every text row)."""
        self.text_rows = text_rows
        if self.limit_steps == 0:
            self.active = False
            return
        if step_calls == 1:
            self.steps += 1
        self.active = step_calls == 1 and (self.limit_steps is None or self.steps <= self.limit_steps)

    def result(self) -> torch.Tensor | None:
        return None if self.acc is None else self.acc.clone()

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _pre_attn(self, module, args, kwargs):
        if self.active:
            t0 = time.perf_counter()
            self._cur = {"rope": kwargs.get("image_rotary_emb"), "mask": kwargs.get("encoder_hidden_states_mask")}
            self.seconds += time.perf_counter() - t0
        return None

    def _grab(self, name):
        def hook(module, args, output):
            if self.active:
                t0 = time.perf_counter()
                self._cur[name] = output.detach()
                self.seconds += time.perf_counter() - t0
        return hook

    def _post_attn(self, module, args, kwargs_or_out, *rest):
        if not self.active:
            return None
        t0 = time.perf_counter()
        cur, self._cur = self._cur, {}
        if all(n in cur for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):  # else: nothing to read
            amap = text_to_image_attention(cur["norm_added_q"], cur["norm_added_k"], cur["norm_k"], cur.get("rope"),
                                           cur.get("mask"), text_rows=self.text_rows)
            self.acc = amap if self.acc is None else self.acc + amap
        self.seconds += time.perf_counter() - t0
        return None


def _rope(q_txt, k_txt, k_img, rope):
    if rope is None:
        return q_txt, k_txt, k_img
    a, b = rope
    if torch.is_complex(a):  # Qwen-Image: (image freqs, text freqs), complex
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        img_f, txt_f = a, b
        return (apply_rotary_emb_qwen(q_txt, txt_f, use_real=False),
                apply_rotary_emb_qwen(k_txt, txt_f, use_real=False),
                apply_rotary_emb_qwen(k_img, img_f, use_real=False))
    from diffusers.models.embeddings import apply_rotary_emb  # Flux: (cos, sin) over [text; image]

    lt = q_txt.shape[1]
    txt, img = (a[:lt], b[:lt]), (a[lt:], b[lt:])
    return (apply_rotary_emb(q_txt, txt, sequence_dim=1), apply_rotary_emb(k_txt, txt, sequence_dim=1),
            apply_rotary_emb(k_img, img, sequence_dim=1))


@torch.no_grad()
def text_to_image_attention(q_txt: torch.Tensor, k_txt: torch.Tensor, k_img: torch.Tensor, rope=None,
                            text_mask: torch.Tensor | None = None, text_rows: int | None = None) -> torch.Tensor:
    """Mean attention of text queries to each image key, [B, L_img]. Inputs [B, L, H, D] (post-norm, pre-RoPE).

    ``text_rows``: only the first ``text_rows`` text tokens (the instruction's) are used, as queries and as keys;
    rows appended after them by other hooks (the Inline Critic's) are left out. Computed one head at a time so that
    memory stays at B x L_txt x (L_txt + L_img) floats.
    """
    q_txt, k_txt, k_img = _rope(q_txt, k_txt, k_img, rope)  # RoPE positions cover every text row: apply, then cut
    if text_rows is not None and text_rows < q_txt.shape[1]:
        q_txt, k_txt = q_txt[:, :text_rows], k_txt[:, :text_rows]
        text_mask = None if text_mask is None else text_mask[:, :text_rows]
    b, lt, h, d = q_txt.shape
    keys = torch.cat([k_txt, k_img], dim=1).float()
    q = q_txt.float()
    valid = None
    if text_mask is not None:
        valid = text_mask.to(q.device).bool().reshape(b, lt)
    out = torch.zeros(b, k_img.shape[1], device=q.device)
    scale = 1.0 / math.sqrt(d)
    for head in range(h):
        logits = torch.einsum("bqd,bkd->bqk", q[:, :, head], keys[:, :, head]) * scale
        if valid is not None:
            key_ok = torch.cat([valid, torch.ones(b, k_img.shape[1], dtype=torch.bool, device=q.device)], 1)
            logits = logits.masked_fill(~key_ok[:, None, :], float("-inf"))
        p = logits.softmax(-1)[:, :, lt:]  # [B, Lt, Li]
        if valid is not None:
            w = valid.float() / valid.float().sum(-1, keepdim=True).clamp_min(1)
            out += (p * w[:, :, None]).sum(1)
        else:
            out += p.mean(1)
    return (out / h).cpu()

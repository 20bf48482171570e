"""Switti's text conditioning: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 through ``transformers``.

As the official ``FrozenCLIPEmbedder`` pair (``models/clip.py``, ``models/pipeline.py``): both tokenizers pad to
their ``model_max_length`` (77 for the real encoders) with truncation; the context is the concatenation of both last
hidden states (768 + 1280 = 2048 wide), the pooled vector is bigG's ``pooler_output`` (1280), and the attention
bias (0 keep, -inf padding) comes from the second tokenizer's attention mask. ``text_encoder_2`` may be a
``CLIPTextModel`` (as the official code loads it) or a ``CLIPTextModelWithProjection``; the pooled vector is the
unprojected EOS hidden state in both cases.

Prompts longer than the encoders' context are truncated, and a warning names the dropped words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class PromptEncoding:
    """Encoded prompts: ``embeds`` (B, T, C1 + C2), ``pooled`` (B, C2), ``bias`` (B, T) additive, and the first
    tokenizer's ``input_ids`` (B, T) and ``attention_mask`` (B, T); ``truncated`` holds a note per truncated
    prompt."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    bias: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[str] = field(default_factory=list)


def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def truncation_notes(tokenizer, prompts: list[str]) -> list[str]:
    """One note per prompt that does not fit the tokenizer's context (start and end tokens included)."""
    notes = []
    limit = tokenizer.model_max_length
    for p in prompts:
        ids = tokenizer(p, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1: limit - 1])
            dropped = tokenizer.decode(ids[limit - 1: -1])
            notes.append(f"prompt has {len(ids)} tokens, the CLIP text encoders read {limit}: it was truncated "
                         f"after {kept[-40:]!r}; dropped: {dropped!r}")
    return notes


def _pooled(text_encoder, out, input_ids: torch.Tensor) -> torch.Tensor:
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    hidden = out.last_hidden_state  # CLIPTextModelWithProjection: pool the EOS position ourselves
    eos = text_encoder.config.eos_token_id
    if eos == 2:  # transformers' legacy rule for old CLIP configs
        pos = input_ids.to(torch.int).argmax(dim=-1)
    else:
        pos = (input_ids == eos).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos.to(hidden.device)]


def encode_prompts(prompts: str | list[str], tokenizer, text_encoder, tokenizer_2, text_encoder_2,
                   device: torch.device | str | None = None, grad: bool = False) -> PromptEncoding:
    """Encode prompts with both CLIP text encoders (see the module docstring); ``grad`` keeps the autograd graph
    (joint training of toy encoders)."""
    with torch.set_grad_enabled(grad):
        return _encode(prompts, tokenizer, text_encoder, tokenizer_2, text_encoder_2, device)


def _encode(prompts, tokenizer, text_encoder, tokenizer_2, text_encoder_2, device) -> PromptEncoding:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    notes = truncation_notes(tokenizer, prompts)
    for n in notes:
        logger.warning("Switti: %s", n)
    device = device or text_encoder.device
    enc1, enc2 = _tokenize(tokenizer, prompts), _tokenize(tokenizer_2, prompts)
    ids1, mask1 = enc1["input_ids"].to(device), enc1["attention_mask"].to(device)
    ids2, mask2 = enc2["input_ids"].to(device), enc2["attention_mask"].to(device)
    out1 = text_encoder(input_ids=ids1, attention_mask=mask1)
    out2 = text_encoder_2(input_ids=ids2, attention_mask=mask2)
    h1, h2 = out1.last_hidden_state, out2.last_hidden_state
    if h1.shape[1] != h2.shape[1]:
        raise ValueError(f"the two tokenizers pad to different lengths ({h1.shape[1]} vs {h2.shape[1]}); "
                         "Switti needs equal contexts")
    embeds = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
    pooled = _pooled(text_encoder_2, out2, ids2)
    bias = torch.zeros(mask2.shape, dtype=torch.float32, device=device).masked_fill(mask2 == 0, float("-inf"))
    return PromptEncoding(embeds=embeds, pooled=pooled, bias=bias, input_ids=ids1, attention_mask=mask1,
                          truncated=notes)

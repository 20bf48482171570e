"""Shared helpers of the AnchorEdit tests (imported explicitly by tests/test_anchoredit_*.py)."""

from __future__ import annotations

import torch

from diffusers_ext.tiny import TinyWanConfig, tiny_wan_transformer

WAN = TinyWanConfig(num_layers=2, num_attention_heads=2, attention_head_dim=12, in_channels=4, text_dim=16,
                    ffn_dim=24, freq_dim=32, rope_max_seq_len=128)


def wan(seed: int = 0, **changes):
    """A tiny real WanTransformer3DModel with a RoPE table long enough for 31 turns at stride 4."""
    from dataclasses import replace

    return tiny_wan_transformer(replace(WAN, **changes), seed=seed)


def inputs(frames: int, batch: int = 2, seed: int = 0, size: int = 4, context: int = 3):
    """(latents [B, C, F, h, w], per-frame timesteps [B, F], per-frame contexts [B, F, L, D])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, WAN.in_channels, frames, size, size, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    ctx = torch.randn(batch, frames, context, WAN.text_dim, generator=g)
    return x, t, ctx


def small_pipeline(seed: int = 0, **anchoredit):
    """The toy AnchorEdit pipeline's architecture with random weights (fast enough for session tests)."""
    from diffusers_ext.anchoredit import AnchorEditConfig
    from diffusers_ext.anchoredit.toy import ToyAnchorEditSpec, toy_pipeline

    spec = ToyAnchorEditSpec(num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, freq_dim=32,
                             vae_base_dim=8, latent_channels=4, text_dim=16, max_turns=6, rope_max_seq_len=64)
    cfg = AnchorEditConfig(**{"sink": 1, "window": 2, "max_turns": 6, **anchoredit})
    return toy_pipeline(spec, seed=seed, anchoredit=cfg)

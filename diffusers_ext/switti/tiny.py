"""Tiny Switti components of the real classes, built in-process (no download): test fixtures and the starting
point of the toy model (:mod:`diffusers_ext.mln.train_toy`).

Example::

    from diffusers_ext.switti.tiny import TinySwittiConfig, tiny_switti_pipeline
    pipe = tiny_switti_pipeline(TinySwittiConfig())          # untrained, 16 px, 4 scales
    image = pipe("a red circle", seed=0, top_k=0).images[0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tiny import build_clip_tokenizer
from .transformer import SwittiTransformer
from .vqvae import SwittiVQVAE


@dataclass(frozen=True)
class TinySwittiConfig:
    patch_nums: tuple[int, ...] = (1, 2, 3, 4)
    vocab_size: int = 64
    z_channels: int = 8
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 1, 2)  # downsample 2 ** (len - 1)
    vae_res_blocks: int = 1
    vae_attn: bool = True
    vae_norm_groups: int = 32
    depth: int = 2
    embed_dim: int = 32
    num_heads: int = 2
    text_dim: int = 16  # CLIP-L stand-in hidden size
    text_dim_2: int = 32  # bigG stand-in hidden size (= pooled size)
    text_layers: int = 1
    max_length: int = 77
    words: tuple[str, ...] = ()


#: The toy world's model size (32 px, 8 x 8 tokens, scales 1-2-3-4-6-8); see diffusers_ext.mln.train_toy.
TOY_SWITTI_CONFIG = TinySwittiConfig(patch_nums=(1, 2, 3, 4, 6, 8), vocab_size=256, z_channels=16, vae_ch=16,
                                     vae_ch_mult=(1, 2, 4), vae_res_blocks=1, vae_norm_groups=8, depth=4,
                                     embed_dim=96, num_heads=3, text_dim=32, text_dim_2=64, text_layers=2,
                                     max_length=77)


def tiny_vqvae(cfg: TinySwittiConfig = TinySwittiConfig(), seed: int = 0) -> SwittiVQVAE:
    torch.manual_seed(seed)
    return SwittiVQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, ch=cfg.vae_ch,
                       ch_mult=cfg.vae_ch_mult, num_res_blocks=cfg.vae_res_blocks, using_sa=cfg.vae_attn,
                       using_mid_sa=cfg.vae_attn, norm_num_groups=cfg.vae_norm_groups,
                       v_patch_nums=cfg.patch_nums).eval()


def tiny_transformer(cfg: TinySwittiConfig = TinySwittiConfig(), seed: int = 0) -> SwittiTransformer:
    torch.manual_seed(seed)
    m = SwittiTransformer(Cvae=cfg.z_channels, V=cfg.vocab_size, depth=cfg.depth, embed_dim=cfg.embed_dim,
                          num_heads=cfg.num_heads, patch_nums=cfg.patch_nums, rope_size=2 * max(cfg.patch_nums),
                          context_dim=cfg.text_dim + cfg.text_dim_2, pooled_embed_size=cfg.text_dim_2)
    m.init_weights()
    return m.eval()


def tiny_text_encoders(cfg: TinySwittiConfig = TinySwittiConfig(), seed: int = 0):
    """``(tokenizer, text_encoder, tokenizer_2, text_encoder_2)``: CLIPTokenizer + CLIPTextModel pairs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    out = []
    for dim in (cfg.text_dim, cfg.text_dim_2):
        tok = build_clip_tokenizer(cfg.words, model_max_length=cfg.max_length)
        enc = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=cfg.text_layers,
            num_attention_heads=2, max_position_embeddings=cfg.max_length, projection_dim=dim, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))
        out += [tok, enc.eval()]
    return tuple(out)


def tiny_switti_components(cfg: TinySwittiConfig = TinySwittiConfig(), seed: int = 0) -> dict:
    tok, te, tok2, te2 = tiny_text_encoders(cfg, seed)
    return {"transformer": tiny_transformer(cfg, seed), "vqvae": tiny_vqvae(cfg, seed), "text_encoder": te,
            "tokenizer": tok, "text_encoder_2": te2, "tokenizer_2": tok2}


def tiny_switti_pipeline(cfg: TinySwittiConfig = TinySwittiConfig(), seed: int = 0, pipeline_cls=None):
    from .pipeline import SwittiPipeline

    return (pipeline_cls or SwittiPipeline)(**tiny_switti_components(cfg, seed))

"""Tiny instances of the real diffusers/transformers classes of FLUX.1 Kontext, Qwen-Image-Edit and Wan 2.1.

They are built in-process from small configs, with no network, and are used as test fixtures and as the starting
point of the toy-world models. Widths and depths are parameters so that callers can pick their own sizes; the
defaults are the smallest that exercise every code path (double and single blocks, RoPE, packing, CFG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizers import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class TinyKontextConfig:
    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 8)  # vae_scale_factor = 2 ** (len - 1)
    text_dim: int = 32  # T5 d_model = joint_attention_dim
    pooled_dim: int = 32  # CLIP hidden = pooled_projection_dim
    guidance_embeds: bool = False
    words: tuple[str, ...] = ()
    vae_norm_num_groups: int | None = None  # None: min(vae_block_out_channels)
    text_layers: int = 1  # depth of both text encoders


def tiny_kontext_components(cfg: TinyKontextConfig = TinyKontextConfig(), seed: int = 0) -> dict:
    """Components of a ``FluxKontextPipeline`` (transformer, vae, two text encoders, two tokenizers, scheduler)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.latent_channels * 4,
        out_channels=None,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=list(cfg.axes_dims_rope),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_block_out_channels),
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups or min(cfg.vae_block_out_channels),
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    tokenizer = build_clip_tokenizer(cfg.words)
    tokenizer_2 = build_t5_tokenizer(cfg.words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.pooled_dim, intermediate_size=2 * cfg.pooled_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=2, max_position_embeddings=77, projection_dim=cfg.pooled_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=cfg.text_dim, d_kv=8, d_ff=2 * cfg.text_dim, num_layers=cfg.text_layers, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_kontext_pipeline(cfg: TinyKontextConfig = TinyKontextConfig(), seed: int = 0):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_kontext_components(cfg, seed))


@dataclass(frozen=True)
class TinyQwenConfig:
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 3
    joint_attention_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (8, 4, 4)
    z_dim: int = 4


def tiny_qwen_edit_components(cfg: TinyQwenConfig = TinyQwenConfig(), seed: int = 0) -> dict:
    """Components of a ``QwenImageEditPipeline``. The Qwen2.5-VL text encoder is left out (``None``): its processor
    needs torchvision in transformers 5, which has no CPU build here; callers pass ``prompt_embeds`` and
    ``prompt_embeds_mask`` (see :func:`random_qwen_prompt_embeds`)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=cfg.z_dim * 4, out_channels=cfg.z_dim, num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim, axes_dims_rope=cfg.axes_dims_rope)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=cfg.z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "scheduler": scheduler,
            "text_encoder": None, "tokenizer": None, "processor": None}


def tiny_qwen_edit_pipeline(cfg: TinyQwenConfig = TinyQwenConfig(), seed: int = 0):
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(**tiny_qwen_edit_components(cfg, seed))


def random_qwen_prompt_embeds(batch: int = 1, length: int = 7, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=g), torch.ones(batch, length, dtype=torch.long)


@dataclass(frozen=True)
class TinyWanConfig:
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    in_channels: int = 16
    text_dim: int = 32
    ffn_dim: int = 32
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_seq_len: int = 32


def tiny_wan_transformer(cfg: TinyWanConfig = TinyWanConfig(), seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=cfg.rope_max_seq_len).eval()


def tiny_wan_vae(z_dim: int = 16, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()

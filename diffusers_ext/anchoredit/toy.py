"""The toy AnchorEdit model: tiny instances of the real Wan classes, sized for 32x32 toy-world images on a CPU.

* ``WanTransformer3DModel``: patch (1, 2, 2), 4 heads x 32, 4 layers, 16 latent channels (as Wan), RoPE table 256 (so 16
  turns x stride 4 fit);
* ``AutoencoderKLWan`` in its Wan 2.2 form (``is_residual=True``, ``patch_size=2``): 32x32 RGB <-> 8x8x16 latents.
  The Wan 2.1 form (no residual shortcuts) at this width could not fit even 16 toy images (L1 stuck at 0.32 after
  150 steps, against 0.11 for the residual form), so the toy uses the 2.2 layout of the same class;
* ``UMT5EncoderModel`` (Wan's text encoder class, 1 layer, d_model 32, frozen random weights) with a T5 tokenizer
  built locally from the toy world's vocabulary (one token per word).

Example::

    from diffusers_ext.anchoredit.toy import ToyAnchorEditSpec, toy_pipeline
    pipe = toy_pipeline(ToyAnchorEditSpec())          # random weights, the bundled model's architecture
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .config import AnchorEditConfig, SamplerConfig


@dataclass(frozen=True)
class ToyAnchorEditSpec:
    # transformer
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 256
    freq_dim: int = 64
    rope_max_seq_len: int = 256
    latent_channels: int = 16
    # VAE (Wan 2.2 layout: pixel patchify 2 + one residual downsample = 4x)
    vae_base_dim: int = 32
    # text encoder
    text_dim: int = 32
    max_sequence_length: int = 16
    # AnchorEdit defaults of the toy model
    max_turns: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def toy_transformer(spec: ToyAnchorEditSpec = ToyAnchorEditSpec(), seed: int = 0):
    from ..tiny import TinyWanConfig, tiny_wan_transformer

    cfg = TinyWanConfig(num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                        attention_head_dim=spec.attention_head_dim, in_channels=spec.latent_channels,
                        text_dim=spec.text_dim, ffn_dim=spec.ffn_dim, freq_dim=spec.freq_dim,
                        rope_max_seq_len=spec.rope_max_seq_len)
    return tiny_wan_transformer(cfg, seed=seed).train()  # a fresh module, as the trainer expects


def toy_vae(spec: ToyAnchorEditSpec = ToyAnchorEditSpec(), seed: int = 0, latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    z = spec.latent_channels
    return AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=z, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * z,
        is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=4,
        scale_factor_temporal=4)


def toy_text_encoder(spec: ToyAnchorEditSpec = ToyAnchorEditSpec(), seed: int = 0):
    """(tokenizer, UMT5EncoderModel) with the toy world's words as single tokens."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..tiny import build_t5_tokenizer
    from ..toy.world import vocabulary

    tok = build_t5_tokenizer(vocabulary(), model_max_length=spec.max_sequence_length)
    torch.manual_seed(seed)
    enc = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=spec.text_dim, d_kv=8, d_ff=2 * spec.text_dim, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return tok, enc.eval().requires_grad_(False)


def toy_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def toy_pipeline(spec: ToyAnchorEditSpec = ToyAnchorEditSpec(), seed: int = 0, *, transformer=None, vae=None,
                 anchoredit: AnchorEditConfig | None = None, sampler: SamplerConfig | None = None):
    """An :class:`~diffusers_ext.anchoredit.pipeline.AnchorEditPipeline` of toy components (random unless given)."""
    from .pipeline import AnchorEditPipeline

    tok, enc = toy_text_encoder(spec, seed)
    pipe = AnchorEditPipeline(
        tokenizer=tok, text_encoder=enc, vae=(vae if vae is not None else toy_vae(spec, seed)).eval(),
        scheduler=toy_scheduler(),
        transformer=(transformer if transformer is not None else toy_transformer(spec, seed)).eval(),
        anchoredit=(anchoredit or AnchorEditConfig(max_turns=spec.max_turns)).to_dict(),
        sampler=(sampler or SamplerConfig.distilled()).to_dict(), max_sequence_length=spec.max_sequence_length)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["ToyAnchorEditSpec", "toy_pipeline", "toy_scheduler", "toy_text_encoder", "toy_transformer", "toy_vae"]

"""Tiny real models (same diffusers/transformers classes as the full-size editors), locally built tokenizers, and
a hand-built Hugging Face cache writer. Used by the tests, the toy world and the benchmarks."""

from .hf_cache import snapshot_path, write_hf_cache_repo
from .models import (
    TinyKontextConfig,
    TinyQwenConfig,
    TinyWanConfig,
    random_qwen_prompt_embeds,
    tiny_kontext_components,
    tiny_kontext_pipeline,
    tiny_qwen_edit_components,
    tiny_qwen_edit_pipeline,
    tiny_wan_transformer,
    tiny_wan_vae,
)
from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "TinyKontextConfig",
    "TinyQwenConfig",
    "TinyWanConfig",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "random_qwen_prompt_embeds",
    "snapshot_path",
    "tiny_kontext_components",
    "tiny_kontext_pipeline",
    "tiny_qwen_edit_components",
    "tiny_qwen_edit_pipeline",
    "tiny_wan_transformer",
    "tiny_wan_vae",
    "write_hf_cache_repo",
]

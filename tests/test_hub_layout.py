"""Tiny real models saved in the exact Hub layout load offline by repo id from a hand-built HF cache."""

import numpy as np
import torch
from PIL import Image

from diffusers_ext.tiny import random_qwen_prompt_embeds, write_hf_cache_repo


def test_kontext_pipeline_from_repo_id_offline(hf_cache, tiny_kontext_dir):
    from diffusers import FluxKontextPipeline
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    write_hf_cache_repo(hf_cache, "editsteer-test/tiny-kontext", tiny_kontext_dir)
    pipe = FluxKontextPipeline.from_pretrained("editsteer-test/tiny-kontext")
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    out = pipe(image=img, prompt="make the red circle blue", height=32, width=32, max_area=32 * 32,
               _auto_resize=False, num_inference_steps=2, max_sequence_length=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_qwen_edit_pipeline_from_repo_id_offline(hf_cache, tiny_qwen_dir):
    from diffusers import QwenImageEditPipeline

    write_hf_cache_repo(hf_cache, "editsteer-test/tiny-qwen-edit", tiny_qwen_dir)
    pipe = QwenImageEditPipeline.from_pretrained("editsteer-test/tiny-qwen-edit", text_encoder=None, tokenizer=None,
                                                 processor=None)
    pe, pm = random_qwen_prompt_embeds()
    img = Image.fromarray(np.full((32, 32, 3), 80, np.uint8))
    out = pipe(image=img, prompt_embeds=pe, prompt_embeds_mask=pm, height=32, width=32, num_inference_steps=2,
               true_cfg_scale=1.0, output_type="np").images
    assert out.shape == (1, 32, 32, 3)


def test_wan_transformer_from_repo_id_offline(hf_cache, tiny_wan_dir):
    from diffusers import WanTransformer3DModel

    write_hf_cache_repo(hf_cache, "editsteer-test/tiny-wan", tiny_wan_dir)
    m = WanTransformer3DModel.from_pretrained("editsteer-test/tiny-wan")
    x = torch.randn(1, 16, 2, 8, 8)
    out = m(x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 5, 32)).sample
    assert out.shape == x.shape

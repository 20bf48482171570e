"""Shared fixtures of the VeriLatent tests: tiny Kontext / Qwen-Image-Edit pipelines and their call arguments.

Import explicitly: ``from fixtures_verilatent import kontext, qwen, kontext_kwargs, qwen_kwargs, DecodeCounter``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def kontext(tiny_kontext_dir):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_kontext_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_kwargs(pipe, index: int = 0, steps: int = 6, **over) -> dict:
    from diffusers_ext.toy import world as W
    from diffusers_ext.toy.editor import toy_pipeline_kwargs

    case = W.make_case("heldout", 0, index)
    kw = toy_pipeline_kwargs(pipe, num_inference_steps=steps)
    kw.update(image=W.to_pil(case.source), prompt=case.instruction, output_type="np")
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir):
    """Tiny QwenImageEditPipeline whose condition image stays at 32x32 (the stock pipeline resizes it to ~1024^2,
    which costs a minute on CPU): the module-level ``calculate_dimensions`` is patched for this module only."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qmod
    from diffusers import QwenImageEditPipeline

    mp = pytest.MonkeyPatch()
    mp.setattr(qmod, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    pipe = QwenImageEditPipeline.from_pretrained(tiny_qwen_dir, text_encoder=None, tokenizer=None, processor=None,
                                                 dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    mp.undo()


def qwen_kwargs(steps: int = 5, true_cfg: float = 4.0, **over) -> dict:
    from diffusers_ext.tiny import random_qwen_prompt_embeds

    pe, pm = random_qwen_prompt_embeds(seed=0)
    ne, nm = random_qwen_prompt_embeds(seed=1)
    pm[:, 5:] = 0  # a padded prompt: the attention map must honour the text mask
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3)).astype(np.uint8))
    kw = dict(image=img, prompt_embeds=pe, prompt_embeds_mask=pm, height=32, width=32, num_inference_steps=steps,
              true_cfg_scale=true_cfg, output_type="np")
    if true_cfg > 1:
        kw.update(negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm)
    kw.update(over)
    return kw


class DecodeCounter:
    """Counts ``pipe.vae.decode`` calls (an instance attribute wrapping the real method; removed on exit)."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.batch = pipe, 0, 0

    def __enter__(self):
        orig = self.pipe.vae.decode

        def counted(z, *a, **k):
            self.calls += 1
            self.batch += z.shape[0]
            return orig(z, *a, **k)

        self.pipe.vae.decode = counted
        return self

    def __exit__(self, *exc):
        del self.pipe.vae.decode

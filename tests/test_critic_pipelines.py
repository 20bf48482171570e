"""The Inline Critic pipelines (Kontext and Qwen-Image-Edit subclasses) and the custom_pipeline shims, offline."""

import numpy as np
import pytest
import torch
from fixtures_critic import TINY_STEPS, critic_editor_dir, critic_folder, strong_steering_  # noqa: F401

from diffusers_ext.critic import InlineCritic, InlineCriticKontextPipeline, InlineCriticQwenEditPipeline, shim_path
from diffusers_ext.critic.apply import installed_critic
from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError
from diffusers_ext.toy import world

KW = dict(height=32, width=32, max_area=32 * 32, _auto_resize=False, num_inference_steps=TINY_STEPS,
          max_sequence_length=16, output_type="np")


def _case():
    c = world.make_case("heldout", 0, 1)
    return world.to_pil(c.source), c.instruction


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_kontext_pipeline_modes_cfg_batch_and_images_per_prompt(critic_editor_dir, critic_folder):
    from diffusers import FluxKontextPipeline

    img, prompt = _case()
    base = FluxKontextPipeline.from_pretrained(critic_editor_dir)
    ref = base(image=img, prompt=prompt, generator=_gens(1), **KW).images

    pipe = InlineCriticKontextPipeline.from_pretrained(critic_editor_dir, critic=critic_folder)
    assert pipe.critic_mode == "steer" and isinstance(pipe.critic, InlineCritic)
    off = pipe(image=img, prompt=prompt, generator=_gens(1), critic_mode="off", **KW)
    assert np.array_equal(off.images, ref) and off.error_maps is None
    crit = pipe(image=img, prompt=prompt, generator=_gens(1), critic_mode="critique", **KW)
    assert np.abs(crit.images - ref).max() <= 1e-5
    assert crit.error_maps.shape == (1, 8, 8) and crit.step_error_maps.shape == (TINY_STEPS, 1, 8, 8)
    steer = pipe(image=img, prompt=prompt, generator=_gens(1), **KW)
    assert np.abs(steer.images - ref).max() > 1e-3
    # between its own calls the critic rests in "off": the plain pipeline sharing the transformer is unchanged
    shared = FluxKontextPipeline.from_pipe(pipe)
    assert np.array_equal(shared(image=img, prompt=prompt, generator=_gens(1), **KW).images, ref)

    # true CFG (a second, negative pass per step), batch 2, two images per prompt
    images, maps = pipe(image=[img, img], prompt=[prompt, "remove the red circle"], negative_prompt=["", ""],
                        true_cfg_scale=2.0, num_images_per_prompt=2, generator=_gens(4), return_dict=False, **KW)
    assert images.shape == (4, 32, 32, 3) and maps.shape == (4, 8, 8)
    calls = []
    h = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    out = pipe(image=img, prompt=prompt, negative_prompt="", true_cfg_scale=2.0, generator=_gens(1), **KW)
    h.remove()
    assert len(calls) == 2 * TINY_STEPS and out.step_error_maps.shape[0] == TINY_STEPS

    pipe.unload_critic()
    assert installed_critic(pipe.transformer) is None
    assert np.array_equal(pipe(image=img, prompt=prompt, generator=_gens(1), **KW).images, ref)
    with pytest.raises(EditSteerConfigError, match="no critic is loaded"):
        pipe(image=img, prompt=prompt, critic_mode="steer", **KW)


def test_load_critic_errors_leave_the_pipeline_as_it_was(critic_editor_dir, critic_folder):
    from diffusers_ext.critic import critic_config_for
    from fixtures_critic import tiny_qwen

    pipe = InlineCriticKontextPipeline.from_pretrained(critic_editor_dir, critic=critic_folder, critic_mode="critique")
    before = pipe.critic
    qwen_critic = InlineCritic(critic_config_for(tiny_qwen(), l_in=0))
    with pytest.raises(ModelFamilyError, match="'qwen-image' family"):
        pipe.load_critic(qwen_critic)
    assert pipe.critic is before and pipe.critic_mode == "critique"
    with pytest.raises(EditSteerConfigError, match="unknown Inline Critic mode"):
        pipe.load_critic(critic_folder, mode="loud")
    assert pipe.critic is before


def test_from_pipe_without_a_critic_runs_the_installed_critic_in_its_mode(critic_editor_dir, critic_folder):
    """``from_pipe(pipe_with_critic)`` shares the transformer and its critic: the new pipeline runs that critic in the
    mode and scale it was loaded with (it used to run the plain model and return no error map)."""
    from diffusers_ext.critic import apply_inline_critic

    img, prompt = _case()
    pipe = InlineCriticKontextPipeline.from_pretrained(critic_editor_dir, critic=critic_folder, critic_mode="critique",
                                                       critic_scale=0.5)
    ref = pipe(image=img, prompt=prompt, generator=_gens(1), **KW)
    same = InlineCriticKontextPipeline.from_pipe(pipe)
    assert same.critic is pipe.critic and (same.critic_mode, same.critic_scale) == ("critique", 0.5)
    out = same(image=img, prompt=prompt, generator=_gens(1), **KW)
    assert out.error_maps is not None and torch.equal(out.error_maps, ref.error_maps)
    assert np.array_equal(out.images, ref.images)
    steer = InlineCriticKontextPipeline.from_pipe(pipe, critic_mode="steer")
    assert (steer.critic_mode, steer.critic_scale, pipe.critic_mode) == ("steer", 0.5, "critique")
    assert np.abs(steer(image=img, prompt=prompt, generator=_gens(1), **KW).images - ref.images).max() > 1e-3

    pipe.unload_critic()  # nothing installed: plain, and asking for a mode is an error
    assert InlineCriticKontextPipeline.from_pipe(pipe).critic_mode == "off"
    with pytest.raises(EditSteerConfigError, match="no critic is given or installed"):
        InlineCriticKontextPipeline.from_pipe(pipe, critic_mode="steer")
    apply_inline_critic(pipe.transformer, critic_folder, mode="critique", scale=0.7)  # installed without a pipeline
    assert InlineCriticKontextPipeline.from_pipe(pipe).critic_mode == "critique"
    pipe.unload_critic()


def test_qwen_pipeline_true_cfg_two_passes(tiny_qwen_dir, monkeypatch):
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    # QwenImageEditPipeline resizes the condition image to ~1 megapixel (16k tokens for the tiny VAE, minutes on
    # CPU); keep it at the image's own 32x32 here. Everything else is the real pipeline.
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))

    from diffusers_ext.critic import critic_config_for
    from diffusers_ext.tiny import random_qwen_prompt_embeds

    base = QwenImageEditPipeline.from_pretrained(tiny_qwen_dir, text_encoder=None, tokenizer=None, processor=None)
    torch.manual_seed(0)
    critic = strong_steering_(InlineCritic(critic_config_for(base.transformer, l_in=0, l_c=(1,), mode="steer",
                                                             adapter_rank=2)))
    pipe = InlineCriticQwenEditPipeline.from_pipe(base, critic=critic)
    pe, pm = random_qwen_prompt_embeds(1, 7, 16)
    npe, npm = random_qwen_prompt_embeds(1, 5, 16, seed=1)
    pm[0, -2:] = 0  # padded prompt tokens: the critic rows come after them, with mask 1
    img = world.to_pil(world.make_case("heldout", 0, 0).source)
    kw = dict(image=img, prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=npe,
              negative_prompt_embeds_mask=npm, true_cfg_scale=3.0, height=32, width=32, num_inference_steps=2,
              output_type="np")
    ref = pipe(**kw, generator=_gens(1), critic_mode="off").images
    assert np.array_equal(ref, base(**kw, generator=_gens(1)).images)
    calls = []
    h = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    out = pipe(**kw, generator=_gens(1))
    h.remove()
    assert len(calls) == 4  # two steps x (conditional + negative pass), both carrying the critic
    assert out.error_maps.shape == (1, 4, 4) and out.step_error_maps.shape == (2, 1, 4, 4)
    assert np.abs(out.images - ref).max() > 1e-4


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_qwen_edit_plus_pipeline_with_apply_inline_critic(monkeypatch, zero_cond_t):
    """Qwen-Image-Edit-2509/2511 run in ``QwenImageEditPlusPipeline`` (several reference images; 2511's config sets
    ``zero_cond_t``): no subclass, but ``apply_inline_critic`` on its transformer works as on any pipeline: critique
    keeps the output, steer changes it, one error map per call over the target grid."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from diffusers_ext.critic import apply_inline_critic, critic_config_for, remove_inline_critic
    from diffusers_ext.tiny import random_qwen_prompt_embeds
    from diffusers_ext.tiny.models import tiny_qwen_edit_components

    # the pipeline resizes every image to ~1 megapixel (minutes on CPU for the tiny VAE): keep 32x32
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "calculate_dimensions", lambda area, ratio: (32, 32))
    parts = tiny_qwen_edit_components()
    if zero_cond_t:
        torch.manual_seed(0)
        parts["transformer"] = QwenImageTransformer2DModel.from_config(
            {**parts["transformer"].config, "zero_cond_t": True})
    pipe = QwenImageEditPlusPipeline(**parts)
    torch.manual_seed(0)
    critic = strong_steering_(InlineCritic(critic_config_for(pipe.transformer, l_in=0, l_c=(1,), adapter_rank=2)))
    pe, pm = random_qwen_prompt_embeds(1, 7, 16)
    imgs = [world.to_pil(world.make_case("heldout", 0, i).source) for i in range(2)]
    kw = {"image": imgs, "prompt_embeds": pe, "prompt_embeds_mask": pm, "height": 32, "width": 32,
          "num_inference_steps": 2, "output_type": "np"}
    ref = pipe(**kw, generator=_gens(1)).images
    handle = apply_inline_critic(pipe.transformer, critic, mode="critique")
    try:
        with handle.session() as records:
            crit = pipe(**kw, generator=_gens(1)).images
        assert np.abs(crit - ref).max() <= 1e-6
        assert len(records) == 2 and records[0].error_map.shape == (1, 4, 4)
        with handle.session(mode="steer"):
            assert np.abs(pipe(**kw, generator=_gens(1)).images - ref).max() > 1e-4
    finally:
        remove_inline_critic(pipe.transformer)


def test_custom_pipeline_shim_offline(critic_editor_dir, critic_folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(critic_editor_dir, custom_pipeline=str(shim_path("kontext")),
                                             trust_remote_code=True, critic=critic_folder)
    assert type(pipe).__name__ == "InlineCriticKontextPipeline" and pipe.critic is not None
    img, prompt = _case()
    out = pipe(image=img, prompt=prompt, generator=_gens(1), **KW)
    assert out.error_maps.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(critic_editor_dir, custom_pipeline=str(shim_path("kontext")))
    assert shim_path("qwen").is_file() and (shim_path("qwen").parent / "pipeline.py").is_file()
    with pytest.raises(EditSteerConfigError, match="unknown shim"):
        shim_path("sdxl")

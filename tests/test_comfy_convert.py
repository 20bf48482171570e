"""Pure tests (no ComfyUI) of what the ComfyUI adapter computes from a diffusers toy editor
(``diffusers_ext.toy.convert``): Flux constructor arguments, the flow shift, latent layout, the VAE adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_ext.errors import ModelFamilyError
from diffusers_ext.toy import convert, world


@pytest.fixture(scope="module")
def tiny_pipe(tiny_kontext_dir):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_kontext_dir)


def test_flux_params_describe_the_transformer(tiny_pipe):
    t = tiny_pipe.transformer
    p = convert.flux_params(t.config)
    assert p["in_channels"] * 4 == t.x_embedder.in_features  # ComfyUI packs 2x2 patches inside the model
    assert p["out_channels"] * 4 == t.proj_out.out_features
    assert p["hidden_size"] == t.inner_dim and p["hidden_size"] % p["num_heads"] == 0
    assert sum(p["axes_dim"]) == p["hidden_size"] // p["num_heads"]
    assert p["depth"] == len(t.transformer_blocks) and p["depth_single_blocks"] == len(t.single_transformer_blocks)
    assert p["context_in_dim"] == t.context_embedder.in_features
    assert p["vec_in_dim"] == t.time_text_embed.text_embedder.linear_1.in_features
    assert p["patch_size"] == 2 and p["guidance_embed"] is False
    # diffusers' single blocks: proj_mlp is mlp_ratio x width
    assert t.single_transformer_blocks[0].proj_mlp.out_features == p["mlp_ratio"] * p["hidden_size"]


@pytest.mark.parametrize("change, message", [
    ({"patch_size": 2}, "patch_size=2"),
    ({"in_channels": 6}, "not 4 x latent channels"),
    ({"axes_dims_rope": (4, 4, 4)}, "do not add up"),
])
def test_flux_params_refuse_what_comfyui_flux_cannot_express(tiny_pipe, change, message):
    cfg = {**dict(tiny_pipe.transformer.config), **change}
    with pytest.raises(ModelFamilyError, match=message):
        convert.flux_params(cfg)


def test_flow_shift_gives_comfyui_simple_schedule_the_diffusers_sigmas(tiny_pipe):
    """ComfyUI's ModelSamplingFlux(shift=mu) + "simple" scheduler picks t = 1, (N-1)/N, ... 1/N and maps them with
    exp(mu) / (exp(mu) + 1/t - 1): the sigmas the diffusers Kontext pipeline sets for the same image size."""
    from diffusers_ext.toy.editor import toy_pipeline_kwargs

    kw = toy_pipeline_kwargs(tiny_pipe)
    steps = kw["num_inference_steps"]
    mu = convert.flow_shift(tiny_pipe.scheduler.config, kw["height"], kw["width"],
                            convert.vae_scale_factor(tiny_pipe.vae.config))
    sched = tiny_pipe.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    comfy_sigmas = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert torch.allclose(sched.sigmas[:-1].double(), comfy_sigmas, atol=1e-6)
    assert float(sched.sigmas[-1]) == 0.0


def test_flow_shift_is_the_static_shift_without_dynamic_shifting():
    assert convert.flow_shift({"use_dynamic_shifting": False, "shift": 3.0}, 1024, 1024, 8) == 3.0
    # FLUX.1 at 1024^2: 4096 tokens -> max_shift
    assert convert.flow_shift({"use_dynamic_shifting": True}, 1024, 1024, 8) == pytest.approx(1.15)


def test_pack_and_unpack_match_the_flux_pipeline():
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 6, 10)
    tokens = convert.pack_latents(z)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, 2, 4, 6, 10))
    assert torch.equal(convert.unpack_latents(tokens, 6, 10), z)


def test_vae_adapter_is_the_kontext_pipeline_encoding(tiny_pipe):
    from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    adapter = convert.AutoencoderKLAdapter(tiny_pipe.vae)
    with torch.no_grad():
        want = retrieve_latents(tiny_pipe.vae.encode(x), sample_mode="argmax")
        got = adapter.encode(x)
        assert torch.equal(got, want)
        assert torch.equal(adapter.decode(got), tiny_pipe.vae.decode(want).sample)
    scale, shift = convert.latent_scaling(tiny_pipe.vae.config)
    assert (scale, shift) == (tiny_pipe.vae.config.scaling_factor, tiny_pipe.vae.config.shift_factor)


def test_latent_rgb_fit_beats_a_constant_preview(tiny_pipe):
    scenes = [world.make_case("train", seed=0, index=i).source for i in range(8)]
    scale, shift = convert.latent_scaling(tiny_pipe.vae.config)
    factors, bias = convert.fit_latent_rgb(tiny_pipe.vae, scenes, scale, shift)
    assert np.asarray(factors).shape == (tiny_pipe.vae.config.latent_channels, 3) and len(bias) == 3
    x = torch.stack([torch.from_numpy(s).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    with torch.no_grad():
        z = (convert.AutoencoderKLAdapter(tiny_pipe.vae).encode(x) - shift) * scale
    rgb = torch.nn.functional.adaptive_avg_pool2d(x, z.shape[-2:])
    pred = torch.einsum("bchw,cr->brhw", z, torch.tensor(factors)) + torch.tensor(bias)[None, :, None, None]
    err = (pred - rgb).pow(2).mean()
    const = (rgb - rgb.mean((0, 2, 3), keepdim=True)).pow(2).mean()
    assert err < const

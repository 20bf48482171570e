"""The Inline Critic inside a real ComfyUI (skipped without COMFYUI_PATH): the patched Flux and Qwen-Image models give
the diffusers adapter's predictions and error maps, the input MODEL stays untouched, bad inputs fail cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from comfy_harness import comfy, requires_comfyui  # noqa: F401
from fixtures_comfy import (comfy_qwen_from_diffusers, comfy_velocity, node_id, parity_report,  # noqa: F401
                            prepare_toy_api, random_critic, record, rel_err, toy_critic_ref, toy_editor_ref)
from fixtures_comfy_workflows import Graph, read_workflow, toy_edit

pytestmark = requires_comfyui
MODES = ("off", "critique", "steer")


@pytest.fixture(scope="module")
def toy(comfy, toy_editor_ref):
    from comfy_nodes.flux_toy import load_toy_for_comfy

    return load_toy_for_comfy(toy_editor_ref)


@pytest.fixture(scope="module")
def pipe(toy_editor_ref):
    from diffusers_ext.critic import InlineCriticKontextPipeline
    from diffusers_ext.toy.editor import load_toy_editor

    return load_toy_editor(toy_editor_ref, pipeline_cls=InlineCriticKontextPipeline)[0]


@pytest.fixture(scope="module")
def critic(pipe, toy_critic_ref, comfy):
    from comfy_nodes.nodes_critic import EditSteerCriticLoader

    return EditSteerCriticLoader.execute(toy_critic_ref, False)[0]


@pytest.mark.parametrize("variant", ["loaded", "l_in in a single block, 2 tokens", "decoupled steering",
                                     "steering adapters"])
def test_flux_parity_with_the_diffusers_adapter(toy, pipe, critic, variant):
    """Velocity and error map of ComfyUI's patched Flux equal the diffusers processors' in every mode (1e-4)."""
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.critic import apply_inline_critic, remove_inline_critic
    from diffusers_ext.toy.convert import pack_latents, unpack_latents

    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    seq, pooled = toy.text_encoder.embed("make the red circle blue")
    seq, pooled = seq.expand(2, -1, -1), pooled.expand(2, -1)
    sigma = torch.tensor([0.8, 0.4])
    ids = pipe._prepare_latent_image_ids(2, 8, 8, torch.device("cpu"), torch.float32)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1
    if variant == "decoupled steering":
        critic = random_critic(pipe.transformer, seed=4, n_tokens=2, steer_attention="decoupled")
    elif variant == "steering adapters":
        critic = random_critic(pipe.transformer, seed=5, n_tokens=2, steer_rank=2)
    elif variant != "loaded":
        n_double = len(pipe.transformer.transformer_blocks)
        depth = n_double + len(pipe.transformer.single_transformer_blocks)
        critic = random_critic(pipe.transformer, seed=3, l_in=n_double, l_c=(depth - 1,), n_tokens=2,
                               steer_start=n_double)
    handle = apply_inline_critic(pipe.transformer, critic, mode="off")
    try:
        results = {}
        for mode in MODES:
            handle.set_mode(mode, 0.8)
            with torch.no_grad():
                v = pipe.transformer(hidden_states=torch.cat([pack_latents(x), pack_latents(ref)], 1),
                                     encoder_hidden_states=seq, pooled_projections=pooled, timestep=sigma,
                                     img_ids=torch.cat([ids, ref_ids]), txt_ids=torch.zeros(seq.shape[1], 3),
                                     return_dict=False)[0][:, :64]
            v = unpack_latents(v, 16, 16)
            m, patch = apply_critic(toy.model, critic, mode=mode, scale=0.8)
            if patch is not None:
                patch.recorder.reset()
            vc = comfy_velocity(m, x, sigma, seq, y=pooled, ref_latents=[ref])
            tag = "" if variant == "loaded" else f" ({variant})"
            assert record(f"critic flux {mode}{tag}: velocity (rel)", rel_err(vc, v)) < 1e-4, mode
            if mode != "off":
                want = handle.last_call.error_map().reshape(2, 8, 8)
                err = rel_err(patch.recorder.mean_map(), want)
                assert record(f"critic flux {mode}{tag}: error map (rel)", err) < 1e-4
            results[mode] = vc
    finally:
        remove_inline_critic(pipe.transformer)
    # critique never changes the output (up to float rounding: the text stream carries one more row through the
    # model's matmuls, in diffusers too); steering does
    assert (results["off"] - results["critique"]).abs().max() < 1e-5
    assert rel_err(results["steer"], results["off"]) > 1e-5


@pytest.mark.parametrize("steer_rank", [0, 2])
def test_qwen_parity_with_the_diffusers_adapter(comfy, steer_rank):
    """The same on ComfyUI's Qwen-Image class (critic rows in the conditioning, next text RoPE positions), on a
    non-square latent with a reference image, with and without steering adapters."""
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.critic import apply_inline_critic, remove_inline_critic
    from diffusers_ext.tiny import random_qwen_prompt_embeds, tiny_qwen_edit_pipeline
    from diffusers_ext.toy.convert import pack_latents, unpack_latents

    t = tiny_qwen_edit_pipeline().transformer
    model = comfy_qwen_from_diffusers(t)
    critic = random_critic(t, seed=1, steer_rank=steer_rank)
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 8, 12
    x, ref = torch.randn(b, 4, h, w, generator=g), torch.randn(b, 4, h, w, generator=g)
    seq, mask = random_qwen_prompt_embeds(b, 7, t.config.joint_attention_dim)
    sigma = torch.tensor([0.6, 0.6])
    handle = apply_inline_critic(t, critic, mode="off")
    try:
        for mode in MODES:
            handle.set_mode(mode, 0.8)
            with torch.no_grad():
                v = t(hidden_states=torch.cat([pack_latents(x), pack_latents(ref)], 1), encoder_hidden_states=seq,
                      encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=[[(1, h // 2, w // 2)] * 2] * b,
                      return_dict=False)[0][:, :(h // 2) * (w // 2)]
            m, patch = apply_critic(model, critic, mode=mode, scale=0.8)
            if patch is not None:
                patch.recorder.reset()
            vc = comfy_velocity(m, x[:, :, None], sigma, seq, ref_latents=[ref[:, :, None]])[:, :, 0]
            key = f"critic qwen {mode}" + (f", steer rank {steer_rank}" if steer_rank else "")
            assert record(f"{key}: velocity (rel)", rel_err(vc, unpack_latents(v, h, w))) < 1e-4, mode
            if mode != "off":
                want = handle.last_call.error_map().reshape(b, h // 2, w // 2)
                assert record(f"{key}: error map (rel)", rel_err(patch.recorder.mean_map(), want)) < 1e-4
    finally:
        remove_inline_critic(t)


def test_qwen_sampling_with_cfg_records_the_conditional_maps(comfy):
    """KSampler-style sampling with true CFG batches cond and uncond rows; the map is the conditional rows'."""
    import comfy.sample
    import comfy.samplers
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.tiny import random_qwen_prompt_embeds, tiny_qwen_edit_pipeline

    t = tiny_qwen_edit_pipeline().transformer
    model, patch = apply_critic(comfy_qwen_from_diffusers(t), random_critic(t, seed=2), mode="steer")
    seq, _ = random_qwen_prompt_embeds(2, 7, 16)
    src = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(src)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[seq[:1], {"reference_latents": [src]}]], [[seq[1:], {"reference_latents": [src]}]])
    guider.set_cfg(2.5)
    out = guider.sample(comfy.sample.prepare_noise(latent, 0), latent, comfy.samplers.sampler_object("euler"), sigmas,
                        seed=0)
    assert torch.isfinite(out).all()
    records = patch.recorder.records
    assert len(records) == 4 and all(r.error_map.shape == (1, 4, 4) for r in records)
    assert [round(r.sigma, 6) for r in records] == [round(float(s), 6) for s in sigmas[:-1]]


def _critic_graph(critic_ref: str, mode: str = "steer", strength: float = 1.0) -> Graph:
    """The toy edit with a second, critic-patched branch sampling the same edit in the same prompt."""
    g = toy_edit()
    n = {x.type: x for x in g.nodes}
    loader, guider, noise, sampler, sigmas, src = (n["EditSteerToyEditorLoader"], n["BasicGuider"], n["RandomNoise"],
                                                   n["KSamplerSelect"], n["BasicScheduler"], n["VAEEncode"])
    critic = g.node("EditSteerCriticLoader", critic=critic_ref, allow_download=False)
    model = g.node("EditSteerApplyCritic", model=loader[0], critic=critic[0], mode=mode, strength=strength)
    guided = g.node("BasicGuider", model=model[0], conditioning=guider.inputs["conditioning"])
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guided[0], sampler=sampler[0], sigmas=sigmas[0],
                 latent_image=src[0])
    img = g.node("VAEDecode", samples=out[0], vae=loader[1])
    g.node("PreviewImage", images=img[0])
    emap = g.node("EditSteerCriticErrorMap", model=model[0], image=img[0], overlay_opacity=0.6)
    g.node("PreviewImage", images=emap[1])
    return g


def _outputs(r, api):
    plain = r.output(node_id(api, "SamplerCustomAdvanced", 0), 0)["samples"]
    critic = r.output(node_id(api, "SamplerCustomAdvanced", 1), 0)["samples"]
    return plain, critic


def test_original_model_unchanged_after_a_critic_branch(comfy, toy_editor_ref, toy_critic_ref):
    from comfy_nodes.critic_patch import installed

    _, plain_api = read_workflow("editsteer_toy_edit")
    alone = comfy.run_prompt(prepare_toy_api(plain_api, toy_editor_ref))
    api = prepare_toy_api(_critic_graph(toy_critic_ref).api(), toy_editor_ref)
    r = comfy.run_prompt(api)
    assert r.success, r.error
    plain, critic = _outputs(r, api)
    assert torch.equal(plain, alone.output(node_id(plain_api, "SamplerCustomAdvanced"), 0)["samples"])
    assert not torch.equal(plain, critic)  # the critic branch did steer
    model = r.output(node_id(api, "EditSteerToyEditorLoader"), 0)
    to = model.model_options["transformer_options"]
    assert installed(model) is None
    assert "patches_replace" not in to and "optimized_attention_override" not in to and "patches" not in to
    assert installed(r.output(node_id(api, "EditSteerApplyCritic"), 0)) is not None


@pytest.mark.parametrize("mode, strength", [("off", 1.0), ("critique", 1.0), ("steer", 0.0)])
def test_settings_that_must_reproduce_the_plain_model(comfy, toy_editor_ref, toy_critic_ref, mode, strength):
    api = prepare_toy_api(_critic_graph(toy_critic_ref, mode, strength).api(), toy_editor_ref)
    if mode == "off":  # no error map without a critic: drop the map and its preview
        for nid in [node_id(api, "EditSteerCriticErrorMap"), node_id(api, "PreviewImage", 2)]:
            del api[nid]
    r = comfy.run_prompt(api)
    assert r.success, r.error
    plain, critic = _outputs(r, api)
    if mode == "off":
        assert torch.equal(plain, critic)  # no patch at all
    else:  # the critic only reads; one more text row through the matmuls: float rounding only
        assert (plain - critic).abs().max() < 1e-5


def test_error_map_node_matches_the_diffusers_pipeline(comfy, toy_editor_ref, toy_critic_ref, pipe, critic):
    """Sampling with the critic in ComfyUI and in the diffusers pipeline gives the same image and error map."""
    from diffusers_ext.toy import world
    from diffusers_ext.toy.editor import toy_pipeline_kwargs

    api = prepare_toy_api(_critic_graph(toy_critic_ref).api(), toy_editor_ref)
    r = comfy.run_prompt(api)
    heat, overlay, mask = (r.output(node_id(api, "EditSteerCriticErrorMap"), i) for i in range(3))
    assert heat.shape == overlay.shape == (1, 32, 32, 3) and mask.shape == (1, 32, 32)
    for t in (heat, overlay, mask):
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert float(mask.max()) == pytest.approx(1.0)
    case = world.make_case("heldout", seed=0, index=0)
    pipe.load_critic(critic, mode="steer", scale=1.0)
    try:
        out = pipe(image=world.to_pil(case.source), prompt=case.instruction, generator=torch.Generator().manual_seed(0),
                   output_type="pt", **toy_pipeline_kwargs(pipe))
    finally:
        pipe.unload_critic()
    edited = r.output(node_id(api, "VAEDecode", 1), 0)
    d = (edited - out.images.permute(0, 2, 3, 1)).abs().max()
    assert record("critic steer 8-step sampling, image (max abs)", d) < 1e-3
    from comfy_nodes.critic_patch import installed

    recorded = installed(r.output(node_id(api, "EditSteerApplyCritic"), 0)).recorder.mean_map()
    assert record("critic steer 8-step sampling, error map (rel)", rel_err(recorded, out.error_maps)) < 1e-4


def test_wrong_family_critic_is_a_node_error_and_the_queue_goes_on(comfy, toy_editor_ref, toy_critic_ref):
    from diffusers_ext.tiny import tiny_qwen_edit_pipeline

    path = comfy.base / "models" / "editsteer" / "test-qwen-critic" / "critic.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    random_critic(tiny_qwen_edit_pipeline().transformer).save_weights(path)
    bad = prepare_toy_api(_critic_graph("test-qwen-critic/critic.safetensors").api(), toy_editor_ref)
    r = comfy.run_prompt(bad)
    assert not r.success
    assert r.error["node_type"] == "EditSteerApplyCritic"
    assert "'qwen-image' family" in r.error["exception_message"] and "flux" in r.error["exception_message"]
    good = prepare_toy_api(_critic_graph(toy_critic_ref).api(), toy_editor_ref)
    assert comfy.run_prompt(good).success


def test_unsupported_model_is_named(toy, critic):
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.errors import ModelFamilyError

    with pytest.raises(ModelFamilyError, match="Flux .* and Qwen-Image .*AutoencoderKLAdapter"):
        apply_critic(toy.vae.patcher, critic)


def test_error_map_without_a_critic_says_what_to_connect(toy):
    from comfy_nodes.nodes_critic import EditSteerCriticErrorMap
    from diffusers_ext.errors import EditSteerConfigError

    with pytest.raises(EditSteerConfigError, match="no Inline Critic"):
        EditSteerCriticErrorMap.execute(toy.model, torch.zeros(1, 32, 32, 3), 0.5)


def test_missing_critic_offline_names_what_was_searched(comfy, tmp_path, monkeypatch):
    """A published critic that is nowhere on this machine, offline: the error names the artifact, the Hub repo,
    the ComfyUI models folder that was searched and why nothing was downloaded."""
    import json

    from comfy_nodes.nodes_critic import EditSteerCriticLoader
    from diffusers_ext.errors import WeightsError

    entry = {"id": "test-missing-critic", "description": "a critic nobody has", "kind": "safetensors",
             "base_model": "flux-kontext", "license": "apache-2.0", "status": "published",
             "repo_id": "editsteer/test-missing-critic", "revision": "0" * 40,
             "files": [{"path": "critic.safetensors", "sha256": "0" * 64, "size": 10}]}
    (tmp_path / "test-missing-critic.json").write_text(json.dumps(entry))
    monkeypatch.setenv("EDITSTEER_MANIFEST_DIR", str(tmp_path))
    with pytest.raises(WeightsError) as e:
        EditSteerCriticLoader.execute("test-missing-critic", False)
    msg = str(e.value)
    assert "test-missing-critic" in msg and "editsteer/test-missing-critic" in msg
    assert str(comfy.base / "models" / "editsteer") in msg  # ComfyUI's folder, registered at import
    assert "HF_HUB_OFFLINE" in msg or "not allowed" in msg
    with pytest.raises(WeightsError, match="editsteer/no-such-critic"):
        EditSteerCriticLoader.execute("editsteer/no-such-critic", False)


def test_patch_survives_cloning_and_shares_the_critic(toy, critic):
    """ModelSamplingFlux & co. clone the MODEL after the critic: the clone keeps the patch (not a copy)."""
    from comfy_nodes.critic_patch import apply_critic, installed

    m, patch = apply_critic(toy.model, critic, mode="steer")
    again = copy.deepcopy(m.model_options)
    assert again["transformer_options"]["optimized_attention_override"].__self__ is patch
    assert installed(m.clone()) is patch


def test_qwen_padded_diffusers_prompt_matches_comfyui_unpadded(comfy):
    """A prompt padded in a diffusers batch (QwenImageEditPipeline pads to the longest prompt) gives the velocity and
    error map that ComfyUI, which never pads, gives for the same prompt: both put the critic rows right after the
    sample's own prompt (diffusers used to put them after the padding)."""
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.critic import apply_inline_critic, remove_inline_critic
    from diffusers_ext.tiny import random_qwen_prompt_embeds, tiny_qwen_edit_pipeline
    from diffusers_ext.toy.convert import pack_latents, unpack_latents

    t = tiny_qwen_edit_pipeline().transformer
    critic = random_critic(t, seed=1, steer_rank=2)
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 8, 8
    x, ref = torch.randn(b, 4, h, w, generator=g), torch.randn(b, 4, h, w, generator=g)
    seq, mask = random_qwen_prompt_embeds(b, 7, t.config.joint_attention_dim)
    mask[1, 5:] = 0  # sample 1: a 5-token prompt padded to 7
    sigma = torch.tensor([0.6, 0.6])
    handle = apply_inline_critic(t, critic, mode="steer", scale=0.8)
    try:
        with torch.no_grad():
            v = t(hidden_states=torch.cat([pack_latents(x), pack_latents(ref)], 1), encoder_hidden_states=seq,
                  encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=[[(1, h // 2, w // 2)] * 2] * b,
                  return_dict=False)[0][:, :(h // 2) * (w // 2)]
        want = handle.last_call.error_map()[1].reshape(1, h // 2, w // 2)
    finally:
        remove_inline_critic(t)
    m, patch = apply_critic(comfy_qwen_from_diffusers(t), critic, mode="steer", scale=0.8)
    patch.recorder.reset()
    vc = comfy_velocity(m, x[1:, :, None], sigma[1:], seq[1:, :5], ref_latents=[ref[1:, :, None]])[:, :, 0]
    assert record("critic qwen steer, padded diffusers prompt: velocity (rel)",
                  rel_err(vc, unpack_latents(v, h, w)[1:])) < 1e-4
    assert record("critic qwen steer, padded diffusers prompt: error map (rel)",
                  rel_err(patch.recorder.mean_map(), want)) < 1e-4


def test_flux_third_index_reference_would_share_the_critics_rope_id(toy, critic):
    """ComfyUI's ref_latents_method "index" numbers Kontext references 1, 2, 3, ...: a third reference would get the
    critic's RoPE index 3; the patch refuses it with a clear error (two references, or the offset method, run)."""
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.errors import EditSteerConfigError

    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    seq, pooled = toy.text_encoder.embed("make the red circle blue")
    m, _ = apply_critic(toy.model, critic, mode="steer")
    sigma = torch.tensor([0.5])
    for refs, method in ((2, "index"), (3, "offset")):
        v = comfy_velocity(m, x, sigma, seq, y=pooled, ref_latents=[ref] * refs, ref_latents_method=method)
        assert torch.isfinite(v).all()
    with pytest.raises(EditSteerConfigError, match="RoPE index 3.*at most two reference images"):
        comfy_velocity(m, x, sigma, seq, y=pooled, ref_latents=[ref] * 3, ref_latents_method="index")


def test_a_later_attention_override_must_chain_to_the_critics(toy, critic):
    """The critic's attention override does the critic's attention; one set after it (a node downstream of Apply
    Inline Critic) that does not call it would let every block attend to the critic rows unscaled: sampling stops
    with a clear error. An override that chains to the critic's runs as usual."""
    from comfy_nodes.critic_patch import apply_critic
    from diffusers_ext.errors import EditSteerError

    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    seq, pooled = toy.text_encoder.embed("make the red circle blue")
    sigma = torch.tensor([0.5])
    m, _ = apply_critic(toy.model, critic, mode="steer")
    want = comfy_velocity(m, x, sigma, seq, y=pooled, ref_latents=[ref])

    def replaced(func, *args, **kwargs):  # e.g. a node that runs its own attention kernel
        return func(*args, **kwargs)

    bad = m.clone()
    bad.model_options["transformer_options"]["optimized_attention_override"] = replaced
    with pytest.raises(EditSteerError, match="attention override was replaced.*replaced"):
        comfy_velocity(bad, x, sigma, seq, y=pooled, ref_latents=[ref])
    del bad.model_options["transformer_options"]["optimized_attention_override"]
    with pytest.raises(EditSteerError, match="is now none"):
        comfy_velocity(bad, x, sigma, seq, y=pooled, ref_latents=[ref])

    good = m.clone()
    previous = good.model_options["transformer_options"]["optimized_attention_override"]
    calls = []

    def chained(func, *args, **kwargs):  # a node that wraps the override already there
        calls.append(1)
        return previous(func, *args, **kwargs)

    good.model_options["transformer_options"]["optimized_attention_override"] = chained
    assert torch.equal(comfy_velocity(good, x, sigma, seq, y=pooled, ref_latents=[ref]), want) and calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_critique_mode_is_the_plain_model_bit_for_bit_on_cpu(comfy, toy_editor_ref, toy_critic_ref, dtype):
    """What the Apply node's tooltip promises for critique mode: the critic only reads, the output is the plain
    model's bit for bit (CPU, one thread as in the diffusers test), Flux and Qwen-Image, float32 and bf16."""
    from comfy_nodes.critic_patch import apply_critic
    from comfy_nodes.flux_toy import load_toy_for_comfy
    from comfy_nodes.nodes_critic import EditSteerCriticLoader
    from diffusers_ext.tiny import random_qwen_prompt_embeds, tiny_qwen_edit_pipeline

    toy = load_toy_for_comfy(toy_editor_ref)  # its own copy: cast below
    toy.model.model.diffusion_model.to(dtype)
    qwen_t = tiny_qwen_edit_pipeline().transformer
    qwen = comfy_qwen_from_diffusers(qwen_t)
    qwen.model.diffusion_model.to(dtype)
    g = torch.Generator().manual_seed(0)
    seq, pooled = toy.text_encoder.embed("make the red circle blue")
    seq = seq.expand(2, -1, -1).to(dtype)
    cases = [(toy.model, EditSteerCriticLoader.execute(toy_critic_ref, False)[0],
              [torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([0.8, 0.4]), seq],
              {"y": pooled.expand(2, -1).to(dtype), "ref_latents": [torch.randn(2, 4, 16, 16, generator=g).to(dtype)]}),
             (qwen, random_critic(qwen_t, seed=1, steer_rank=2),
              [torch.randn(2, 4, 1, 8, 12, generator=g).to(dtype), torch.tensor([0.6, 0.6]),
               random_qwen_prompt_embeds(2, 7, 16)[0].to(dtype)],
              {"ref_latents": [torch.randn(2, 4, 1, 8, 12, generator=g).to(dtype)]})]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model, critic, args, kwargs in cases:
            plain = comfy_velocity(model, *args, **kwargs)
            m, patch = apply_critic(model, critic, mode="critique")
            patch.recorder.reset()
            assert torch.equal(comfy_velocity(m, *args, **kwargs), plain)
            assert patch.recorder.mean_map() is not None
    finally:
        torch.set_num_threads(threads)

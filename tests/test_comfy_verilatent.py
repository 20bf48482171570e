"""VeriLatent inside a real ComfyUI (skipped without COMFYUI_PATH): the SAMPLER composes with SamplerCustomAdvanced,
its choice reproduces with a plain run, it matches the diffusers wrapper, and bad inputs fail cleanly."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from comfy_harness import comfy, requires_comfyui  # noqa: F401
from fixtures_comfy import (node_id, parity_report, prepare_toy_api, record, rel_err, toy_critic_ref,  # noqa: F401
                            toy_editor_ref)
from fixtures_comfy_workflows import Graph, read_workflow, toy_edit

pytestmark = requires_comfyui


def _search_graph(candidates=4, budget=8, early_step=2, top_m=1, round_size=4, seed=0, steps=8,
                  source_latent: bool = False, upscale_source: bool = False, **optional) -> Graph:
    """The toy edit with its euler sampler wrapped by VeriLatent Sampler, and a report (``optional``: more inputs
    of the sampler node, e.g. rollout_batch)."""
    g = toy_edit()
    n = {x.type: x for x in g.nodes}
    sca, base, src = n["SamplerCustomAdvanced"], n["KSamplerSelect"], n["VAEEncode"]
    n["RandomNoise"].inputs["noise_seed"] = seed
    n["BasicScheduler"].inputs["steps"] = steps
    extra = {}
    if source_latent:
        extra["source_latent"] = src[0]
    if upscale_source:
        extra["source_latent"] = g.node("LatentUpscaleBy", samples=src[0], upscale_method="nearest-exact",
                                        scale_by=2.0)[0]
    search = g.node("EditSteerVeriLatentSampler", sampler=base[0], candidates=candidates, budget=budget,
                    early_step=early_step, top_m=top_m, round_size=round_size, **extra, **optional)
    sca.inputs["sampler"] = search[0]
    g.node("EditSteerVeriLatentReport", search_log=search[1], latent=sca[0])
    return g


def _run(comfy, editor, g_or_api, **changes):
    api = g_or_api if isinstance(g_or_api, dict) else g_or_api.api()
    api = prepare_toy_api(api, editor)
    r = comfy.run_prompt(api)
    return api, r


def _latent(r, api):
    return r.output(node_id(api, "SamplerCustomAdvanced"), 0)["samples"]


def _plain(comfy, editor, seed, steps=8):
    _, api = read_workflow("editsteer_toy_edit")
    api = prepare_toy_api(api, editor)
    api[node_id(api, "RandomNoise")]["inputs"]["noise_seed"] = seed
    api[node_id(api, "BasicScheduler")]["inputs"]["steps"] = steps
    r = comfy.run_prompt(api)
    assert r.success, r.error
    return _latent(r, api)


def test_chosen_seed_reproduces_with_a_plain_sampler(comfy, toy_editor_ref):
    api, r = _run(comfy, toy_editor_ref, _search_graph(seed=5))
    assert r.success, r.error
    rep = node_id(api, "EditSteerVeriLatentReport")
    nfe, chosen, report = r.output(rep, 0), r.output(rep, 1), r.output(rep, 2)
    import json

    report = json.loads(report)
    n = report["candidates"]
    assert n in (4, 8) and report["seeds"] == list(range(5, 5 + n))
    assert nfe == n * 2 + 1 * (8 - 2) == report["nfe_measured"]  # N k + m (T - k), measured = formula
    assert chosen == report["chosen_seeds"][0] and 5 <= chosen < 5 + n
    d = (_latent(r, api) - _plain(comfy, toy_editor_ref, chosen)).abs().max()
    assert record("verilatent result vs plain run of the chosen seed (max abs)", d) < 1e-5
    assert "chosen seed" in r.ui[rep]["text"][0]
    maps = r.output(rep, 3)
    assert maps.ndim == 4 and maps.shape[-1] == 3 and maps.shape[2] > maps.shape[1]  # a row of map tiles


def test_a_mask_replaces_the_consensus_region(comfy, toy_editor_ref):
    import json

    g = _search_graph(candidates=4, budget=4)
    n = {x.type: x for x in g.nodes}
    n["EditSteerVeriLatentSampler"].inputs["mask"] = n["EditSteerToyCase"][3]
    api, r = _run(comfy, toy_editor_ref, g)
    assert r.success, r.error
    report = json.loads(r.output(node_id(api, "EditSteerVeriLatentReport"), 2))
    from diffusers_ext.toy import world

    mask = world.make_case("heldout", seed=0, index=0).mask.astype("float32")
    assert report["region_kind"] == "mask"
    assert report["region_coverage"] == pytest.approx(float(mask.mean()), abs=1e-6)


def test_budget_one_is_the_plain_sampler_bit_for_bit(comfy, toy_editor_ref):
    api, r = _run(comfy, toy_editor_ref, _search_graph(candidates=1, budget=1, top_m=1, seed=2))
    assert r.success, r.error
    assert torch.equal(_latent(r, api), _plain(comfy, toy_editor_ref, 2))
    assert r.output(node_id(api, "EditSteerVeriLatentReport"), 0) == 8


def test_top_m_returns_the_finalists_best_first(comfy, toy_editor_ref):
    api, r = _run(comfy, toy_editor_ref, _search_graph(candidates=4, budget=4, top_m=2, seed=0))
    assert r.success, r.error
    import json

    report = json.loads(r.output(node_id(api, "EditSteerVeriLatentReport"), 2))
    out = _latent(r, api)
    assert out.shape[0] == 2
    for row, seed in zip(out, report["chosen_seeds"]):
        assert (row - _plain(comfy, toy_editor_ref, seed)[0]).abs().max() < 1e-5


def test_search_matches_the_diffusers_wrapper(comfy, toy_editor_ref):
    """Same candidates, same judgement, same choice, same image as diffusers' VeriLatentSearch on the same weights."""
    from diffusers_ext.toy import world
    from diffusers_ext.toy.convert import unpack_latents
    from diffusers_ext.toy.editor import load_toy_editor, toy_pipeline_kwargs
    from diffusers_ext.verilatent import VeriLatentConfig
    from diffusers_ext.verilatent.diffusers_wrapper import VeriLatentSearch

    api, r = _run(comfy, toy_editor_ref, _search_graph(candidates=4, budget=8, seed=1))
    import json

    got = json.loads(r.output(node_id(api, "EditSteerVeriLatentReport"), 2))
    pipe, _ = load_toy_editor(toy_editor_ref)
    case = world.make_case("heldout", seed=0, index=0)
    cfg = VeriLatentConfig(n0=4, n_max=8, round_size=4, top_m=1, k=2, activation="latent")  # as the SAMPLER
    out = VeriLatentSearch(pipe, cfg)(image=world.to_pil(case.source), prompt=case.instruction, seed=1,
                                      output_type="latent", **toy_pipeline_kwargs(pipe))
    want = out.report.to_json()
    for key in ("seeds", "round_sizes", "finalists", "chosen_seeds", "nfe", "bucket"):
        assert got[key] == want[key], key
    score_diff = (torch.tensor(got["scores"]) - torch.tensor(want["scores"])).abs().max()
    assert record("verilatent candidate scores (max abs)", score_diff) < 1e-4
    z = unpack_latents(out.images, 16, 16) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    assert record("verilatent chosen latent (rel)", rel_err(_latent(r, api), z)) < 1e-4


def test_one_node_edit_equals_the_sampler_route(comfy, toy_editor_ref):
    api, r = _run(comfy, toy_editor_ref, _search_graph(seed=3))
    g = toy_edit()
    n = {x.type: x for x in g.nodes}
    cond = n["BasicGuider"].inputs["conditioning"]
    edit = g.node("EditSteerVeriLatentEdit", model=n["EditSteerToyEditorLoader"][0], positive=cond,
                  latent_image=n["VAEEncode"][0], seed=3, steps=8, cfg=1.0, sampler_name="euler", scheduler="simple",
                  candidates=4, budget=8, early_step=2, top_m=1, round_size=4)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=edit[0], vae=n["EditSteerToyEditorLoader"][1])[0])
    api2, r2 = _run(comfy, toy_editor_ref, g)
    assert r2.success, r2.error
    e = node_id(api2, "EditSteerVeriLatentEdit")
    rep = node_id(api, "EditSteerVeriLatentReport")
    assert r2.output(e, 2) == r.output(rep, 1) and r2.output(e, 1) == r.output(rep, 0)
    assert (r2.output(e, 0)["samples"] - _latent(r, api)).abs().max() < 1e-6
    assert "chosen seed" in r2.ui[e]["text"][0]


def test_stacked_critic_and_search_workflow(comfy, toy_editor_ref, toy_critic_ref):
    _, api = read_workflow("editsteer_toy_critic_verilatent")
    api = prepare_toy_api(api, toy_editor_ref, toy_critic_ref)
    r = comfy.run_prompt(api)
    assert r.success, r.error
    chosen = r.output(node_id(api, "EditSteerVeriLatentReport"), 1)
    heat = r.output(node_id(api, "EditSteerCriticErrorMap"), 0)
    assert heat.shape == (1, 32, 32, 3)
    # the search ran through the critic-patched model: a plain critic run of the chosen seed gives the same latent
    plain = copy.deepcopy(api)
    sca = node_id(plain, "SamplerCustomAdvanced")
    plain[sca]["inputs"]["sampler"] = plain[node_id(plain, "EditSteerVeriLatentSampler")]["inputs"]["sampler"]
    plain[node_id(plain, "RandomNoise")]["inputs"]["noise_seed"] = chosen
    for t in ("EditSteerVeriLatentReport", "EditSteerVeriLatentSampler"):
        del plain[node_id(plain, t)]
    del plain[node_id(plain, "PreviewImage", 0)]
    r2 = comfy.run_prompt(plain)
    assert r2.success, r2.error
    assert (_latent(r, api) - _latent(r2, plain)).abs().max() < 1e-5


def test_search_on_a_qwen_image_model(comfy):
    """The same SAMPLER on ComfyUI's Qwen-Image class (video-shaped latents, reference latent from the conditioning,
    true CFG with a negative): the chosen candidate equals a plain euler run of its seed."""
    import comfy.sample
    import comfy.samplers
    from comfy_nodes.search_sampler import VeriLatentSampler
    from diffusers_ext.tiny import random_qwen_prompt_embeds, tiny_qwen_edit_pipeline
    from diffusers_ext.verilatent import VeriLatentConfig
    from fixtures_comfy import comfy_qwen_from_diffusers

    model = comfy_qwen_from_diffusers(tiny_qwen_edit_pipeline().transformer)
    seq, _ = random_qwen_prompt_embeds(2, 7, 16)
    src = torch.randn(1, 4, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[seq[:1], {"reference_latents": [src]}]], [[seq[1:], {"reference_latents": [src]}]])
    guider.set_cfg(2.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 6)
    latent = torch.zeros_like(src)
    sampler = VeriLatentSampler(comfy.samplers.sampler_object("euler"), VeriLatentConfig(n0=3, k=2))
    out = guider.sample(comfy.sample.prepare_noise(latent, 7), latent, sampler, sigmas, seed=7)
    report = sampler.log.report
    assert report.seeds == [7, 8, 9] and report.passes_per_step == 2 and report.nfe == (3 * 2 + 4) * 2
    assert report.grid == (4, 6)
    seed = report.chosen_seeds[0]
    plain = guider.sample(comfy.sample.prepare_noise(latent, seed), latent, comfy.samplers.sampler_object("euler"),
                          sigmas, seed=seed)
    assert out.shape == plain.shape == (1, 4, 1, 8, 12)
    assert (out - plain).abs().max() < 1e-5


def test_progress_and_previews_during_the_search(comfy, toy_editor_ref):
    import comfy.utils as comfy_utils
    from comfy.cli_args import LatentPreviewMethod, args

    calls = []
    old = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: calls.append((value, total, preview)))
    try:
        _, r = _run(comfy, toy_editor_ref, _search_graph(candidates=4, budget=4, seed=0))
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        args.preview_method = old
    assert r.success, r.error
    search = [c for c in calls if c[1] == 4 * 2 + 1 * 6]  # one bar over the budget's candidate-steps
    values = [c[0] for c in search]
    assert values == sorted(values) and values[-1] == 14 and len(values) >= 6
    assert all(c[2] is not None and c[2][0] == "JPEG" for c in search)  # a latent preview with every update


def test_interrupt_stops_the_search(comfy, toy_editor_ref):
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    from comfy_nodes.flux_toy import load_toy_for_comfy
    from comfy_nodes.search_sampler import VeriLatentSampler
    from diffusers_ext.toy import world
    from diffusers_ext.verilatent import VeriLatentConfig

    toy = load_toy_for_comfy(toy_editor_ref)
    case = world.make_case("heldout", seed=0, index=0)
    src = toy.vae.encode(torch.from_numpy(case.source).float()[None] / 255.0)
    cond = toy.text_encoder.encode(case.instruction)
    cond[0][1]["reference_latents"] = [src]
    guider = comfy.samplers.CFGGuider(toy.model)
    guider.inner_set_conds({"positive": cond})
    sigmas = comfy.samplers.calculate_sigmas(toy.model.get_model_object("model_sampling"), "simple", 8)
    sampler = VeriLatentSampler(comfy.samplers.sampler_object("euler"), VeriLatentConfig.adaptive())
    steps = []

    def callback(step, x0, x, total):
        steps.append(step)
        mm.interrupt_current_processing(True)  # the user presses Cancel during the first rollout

    try:
        with pytest.raises(mm.InterruptProcessingException):
            guider.sample(comfy.sample.prepare_noise(src, 0), src, sampler, sigmas, callback=callback, seed=0)
    finally:
        mm.interrupt_current_processing(False)
    assert len(steps) == 1
    assert "patches_replace" not in toy.model.model_options["transformer_options"]


def test_budget_zero_is_a_node_error_and_the_queue_goes_on(comfy, toy_editor_ref):
    import execution

    api = prepare_toy_api(_search_graph(candidates=0).api(), toy_editor_ref)
    _ok, _err, good_outputs, node_errors = asyncio.run(execution.validate_prompt("t", api, None))
    (nid, errors), = node_errors.items()
    assert errors["class_type"] == "EditSteerVeriLatentSampler"
    assert "candidates" in str(errors["errors"]) and "smaller than min of 1" in str(errors["errors"])
    assert node_id(api, "SaveImage") not in good_outputs  # ComfyUI drops the outputs that depend on it
    api, r = _run(comfy, toy_editor_ref, _search_graph(candidates=4, budget=2))  # budget below the first round
    assert not r.success and r.error["node_type"] == "EditSteerVeriLatentSampler"
    assert "budget (2)" in r.error["exception_message"]
    _, r = _run(comfy, toy_editor_ref, _search_graph())
    assert r.success, r.error


def test_source_latent_of_another_size_is_a_node_error(comfy, toy_editor_ref):
    api, r = _run(comfy, toy_editor_ref, _search_graph(upscale_source=True))
    assert not r.success and r.error["node_type"] == "SamplerCustomAdvanced"
    assert "source latent has shape (4, 32, 32)" in r.error["exception_message"]
    assert "latent being sampled has (4, 16, 16)" in r.error["exception_message"]
    _, r = _run(comfy, toy_editor_ref, _search_graph(source_latent=True))
    assert r.success, r.error


def _toy_guider(toy_editor_ref, model_wrapper=None):
    """A CFGGuider over the toy editor as ComfyUI objects (cfg 1), its source latent and 8-step sigmas."""
    import comfy.samplers
    from comfy_nodes.flux_toy import load_toy_for_comfy
    from diffusers_ext.toy import world

    toy = load_toy_for_comfy(toy_editor_ref)
    case = world.make_case("heldout", seed=0, index=0)
    src = toy.vae.encode(torch.from_numpy(case.source).float()[None] / 255.0)
    cond = toy.text_encoder.encode(case.instruction)
    cond[0][1]["reference_latents"] = [src]
    model = toy.model.clone()
    if model_wrapper is not None:
        model.set_model_unet_function_wrapper(model_wrapper)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": cond})
    sigmas = comfy.samplers.calculate_sigmas(toy.model.get_model_object("model_sampling"), "simple", 8)
    return guider, src, sigmas


def test_rollout_batch_bounds_every_model_batch_and_does_not_change_the_result(comfy, toy_editor_ref):
    """ComfyUI reserved memory for a batch of one image: rollout_batch caps the rows of every model call (early
    steps and finalists), and the search's choice and output are the same for any value."""
    import comfy.sample
    import comfy.samplers
    from comfy_nodes.search_sampler import VeriLatentSampler
    from diffusers_ext.verilatent import VeriLatentConfig

    rows = []

    def count(apply_model, args):  # ComfyUI's own model wrapper hook: sees every call's batch
        rows.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    guider, src, sigmas = _toy_guider(toy_editor_ref, count)
    runs = {}
    for batch in (None, 1, 3):
        rows.clear()
        cfg = VeriLatentConfig(n0=4, n_max=8, round_size=4, top_m=2, k=2, activation="latent", tau_easy=1e9,
                               rollout_batch=batch)
        sampler = VeriLatentSampler(comfy.samplers.sampler_object("euler"), cfg)
        out = guider.sample(comfy.sample.prepare_noise(src, 0), src, sampler, sigmas, seed=0)
        runs[batch] = (out, sampler.log.report, list(rows))
    assert sorted(set(runs[None][2])) == [2, 4]  # two rounds of 4 at once, then the 2 finalists
    assert set(runs[1][2]) == {1}
    assert max(runs[3][2]) == 3 and 1 in runs[3][2]  # 4 = 3 + 1 per round, 2 finalists in one call
    out0, rep0, rows0 = runs[None]
    for batch in (1, 3):
        out, rep, used = runs[batch]
        assert sum(used) == sum(rows0) == rep.nfe == rep.nfe_measured == 8 * 2 + 2 * 6
        assert rep.chosen_seeds == rep0.chosen_seeds and rep.seeds == rep0.seeds
        assert (torch.tensor(rep.scores) - torch.tensor(rep0.scores)).abs().max() < 1e-4
        assert (out - out0).abs().max() < 1e-5


def test_rollout_batch_node_input_reaches_the_search(comfy, toy_editor_ref):
    import json

    reports = {}
    for batch in (None, 2):  # None: the input left out of the prompt (older workflows): the default, 1
        extra = {} if batch is None else {"rollout_batch": batch}
        api, r = _run(comfy, toy_editor_ref, _search_graph(candidates=4, budget=4, seed=6, **extra))
        assert r.success, r.error
        reports[batch] = (json.loads(r.output(node_id(api, "EditSteerVeriLatentReport"), 2)), _latent(r, api))
    assert reports[None][0]["config"]["rollout_batch"] == 1 and reports[2][0]["config"]["rollout_batch"] == 2
    assert reports[None][0]["chosen_seeds"] == reports[2][0]["chosen_seeds"]
    assert (reports[None][1] - reports[2][1]).abs().max() < 1e-5


def _edit_graph(cfg: float, negative: bool, **inputs) -> Graph:
    """The toy edit sampled by the one-node VeriLatent Edit (budget 1 unless ``inputs`` say otherwise); with
    ``negative`` the positive conditioning is also the negative one (so cfg must not change the result)."""
    g = toy_edit()
    n = {x.type: x for x in g.nodes}
    cond = n["BasicGuider"].inputs["conditioning"]
    args = dict(model=n["EditSteerToyEditorLoader"][0], positive=cond, latent_image=n["VAEEncode"][0], seed=3,
                steps=8, cfg=cfg, sampler_name="euler", scheduler="simple", candidates=1, budget=1, early_step=2,
                top_m=1, round_size=4)
    args.update(inputs)
    if negative:
        args["negative"] = cond
    edit = g.node("EditSteerVeriLatentEdit", **args)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=edit[0], vae=n["EditSteerToyEditorLoader"][1])[0])
    return g


def test_one_node_edit_with_cfg_needs_a_negative(comfy, toy_editor_ref):
    """Without a negative, CFGGuider would return cond * cfg (a broken image, no error): the node refuses, as
    KSampler's required negative does. With one, guidance runs (negative = positive: the cfg 1 result)."""
    api, r = _run(comfy, toy_editor_ref, _edit_graph(3.0, negative=False))
    assert not r.success and r.error["node_type"] == "EditSteerVeriLatentEdit"
    assert "no negative conditioning is connected" in r.error["exception_message"]
    results = {}
    for cfg, neg in ((1.0, False), (3.0, True)):
        api, r = _run(comfy, toy_editor_ref, _edit_graph(cfg, negative=neg))
        assert r.success, r.error
        e = node_id(api, "EditSteerVeriLatentEdit")
        results[cfg] = (r.output(e, 0)["samples"], r.output(e, 1))
    assert results[1.0][1] == 8 and results[3.0][1] == 16  # NFE: the negative pass counts
    assert (results[3.0][0] - results[1.0][0]).abs().max() < 1e-5

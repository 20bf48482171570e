"""VeriLatent around real diffusers pipelines (tiny FluxKontextPipeline and QwenImageEditPipeline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_verilatent import DecodeCounter, kontext, kontext_kwargs, qwen, qwen_kwargs  # noqa: F401

from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError
from diffusers_ext.verilatent import FlowEulerSampler, VeriLatentConfig, run_search
from diffusers_ext.verilatent.attention import double_stream_attentions, text_to_image_attention
from diffusers_ext.verilatent.diffusers_wrapper import VeriLatentSearch, run_verilatent

HARD = dict(tau_easy=1e9)  # never "easy": forces every adaptive round


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scheduler_state(pipe):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(pipe.scheduler).items()}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---- parity -------------------------------------------------------------------------------------------------------

def test_budget_one_is_the_plain_kontext_pipeline_bit_for_bit(kontext):
    kw = kontext_kwargs(kontext)
    plain = kontext(**kw, generator=_gen(7)).images
    g = _gen(7)
    out = VeriLatentSearch(kontext)(**kw, generator=g)  # default config: budget 1
    assert np.array_equal(out.images, plain)
    assert out.report.nfe == out.report.nfe_measured == 6 and out.report.chosen_seeds == [7]
    assert out.report.maps()["normalised"].shape == (1, 8, 8)  # the step-k map comes free
    # the user's generator advanced exactly as in a plain call
    assert torch.equal(g.get_state(), (lambda h: (kontext(**kw, generator=h), h)[1])(_gen(7)).get_state())


def test_kontext_continued_candidates_equal_straight_runs_and_are_never_decoded_early(kontext):
    kw = kontext_kwargs(kontext)
    cfg = VeriLatentConfig.adaptive(k=2, n_max=8, top_m=2, **HARD)
    with DecodeCounter(kontext) as dec:
        out = VeriLatentSearch(kontext, cfg)(**kw, seed=3)
    r = out.report
    assert (r.rounds, r.candidates, r.seeds[:2]) == (2, 8, [3, 4])
    assert dec.calls == 1 and dec.batch == 2  # only the two finalists, once, at the end
    assert r.nfe == r.nfe_measured == 8 * 2 + 2 * (6 - 2)
    assert len(out.images) == 2 and r.final_scores is not None
    for img, s in zip(out.images, r.chosen_seeds):
        straight = kontext(**kw, generator=_gen(s)).images[0]
        assert np.abs(img - straight).max() <= 1e-5


def test_kontext_encodes_prompt_and_image_once_per_search_with_true_cfg(kontext):
    """Later calls reuse the prompt embeddings and the source latents the first call computed (and stay exact)."""
    kw = kontext_kwargs(kontext, true_cfg_scale=2.0, negative_prompt="")
    calls = {"t5": 0, "encode": 0}
    h = kontext.text_encoder_2.register_forward_pre_hook(lambda m, a: calls.__setitem__("t5", calls["t5"] + 1))
    orig = kontext.vae.encode
    kontext.vae.encode = lambda *a, **k: (calls.__setitem__("encode", calls["encode"] + 1), orig(*a, **k))[1]
    try:
        out = VeriLatentSearch(kontext, VeriLatentConfig.adaptive(k=2, n_max=8, **HARD))(**kw, seed=5)
    finally:
        h.remove()
        del kontext.vae.encode
    assert calls == {"t5": 2, "encode": 1}  # prompt + negative prompt once, the image once; 3 pipeline calls
    r = out.report
    assert r.passes_per_step == 2 and r.nfe == r.nfe_measured == (8 * 2 + 4) * 2
    straight = kontext(**kw, generator=_gen(r.chosen_seeds[0])).images[0]
    assert np.abs(out.images[0] - straight).max() <= 1e-5


def test_qwen_true_cfg_continued_candidate_equals_straight_run_and_nfe_counts_two_passes(qwen):
    kw = qwen_kwargs(steps=5, true_cfg=4.0)
    plain = qwen(**kw, generator=_gen(11)).images
    assert np.array_equal(VeriLatentSearch(qwen)(**kw, generator=_gen(11)).images, plain)
    out = VeriLatentSearch(qwen, VeriLatentConfig.fixed(3, k=2))(**kw, generator=_gen(11))
    r = out.report
    assert r.passes_per_step == 2 and r.nfe == r.nfe_measured == (3 * 2 + 1 * 3) * 2
    straight = qwen(**kw, generator=_gen(r.chosen_seeds[0])).images[0]
    assert np.abs(out.images[0] - straight).max() <= 1e-5
    assert r.grid == (4, 4)


def test_rollout_batch_does_not_change_the_result(kontext):
    kw = kontext_kwargs(kontext, output_type="latent")
    a = VeriLatentSearch(kontext, VeriLatentConfig.fixed(4, k=1))(**kw, seed=0)
    b = VeriLatentSearch(kontext, VeriLatentConfig.fixed(4, k=1, rollout_batch=3))(**kw, seed=0)
    assert a.report.chosen_seeds == b.report.chosen_seeds
    assert np.allclose(a.report.scores, b.report.scores, atol=1e-5)
    assert torch.allclose(a.images, b.images, atol=1e-5)


# ---- the sampler-level object -------------------------------------------------------------------------------------

def _kontext_flow_sampler(pipe, kw):
    """FlowEulerSampler over the tiny Kontext transformer, fed the exact inputs a plain call gives it."""
    seen = {}

    def grab(m, a, k):
        seen.setdefault("kw", dict(k))

    h = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    pipe(**dict(kw, output_type="latent"), generator=_gen(0))
    h.remove()
    base, sig, ts = seen["kw"], pipe.scheduler.sigmas.clone(), pipe.scheduler.timesteps.clone()
    n_tok = base["img_ids"].shape[0] // 2
    cond = base["hidden_states"][:, n_tok:]
    t_of = {round(float(s), 6): t for s, t in zip(sig[:-1], ts)}

    @torch.no_grad()
    def denoise(x, sigma):
        n = x.shape[0]
        args = dict(base, hidden_states=torch.cat([x, cond.expand(n, -1, -1)], 1),
                    timestep=t_of[round(sigma, 6)].expand(n).to(x.dtype) / 1000,
                    encoder_hidden_states=base["encoder_hidden_states"].expand(n, -1, -1),
                    pooled_projections=base["pooled_projections"].expand(n, -1))
        v = pipe.transformer(**args)[0][:, :n_tok]
        return x - sigma * v

    c = pipe.transformer.config.in_channels // 4
    hw = 2 * (kw["height"] // (pipe.vae_scale_factor * 2))

    def noise(seed):
        z = torch.randn(1, c, hw, hw, generator=_gen(seed))
        return pipe._pack_latents(z, 1, c, hw, hw)

    return FlowEulerSampler(denoise, sig, noise, cond[0], grid=(hw // 2, hw // 2))


def test_sampler_level_search_on_a_plain_euler_loop_equals_the_diffusers_wrapper(kontext):
    kw = kontext_kwargs(kontext, output_type="latent")
    cfg = VeriLatentConfig.adaptive(k=2, n_max=8, activation="latent", **HARD)  # a plain loop has no attention
    wrapped = VeriLatentSearch(kontext, cfg)(**kw, seed=20)
    loop = run_search(_kontext_flow_sampler(kontext, kw), cfg, seed=20)
    assert loop.report.chosen_seeds == wrapped.report.chosen_seeds
    assert loop.report.seeds == wrapped.report.seeds
    assert np.allclose(loop.report.scores, wrapped.report.scores, atol=1e-4)
    assert torch.allclose(loop.output, wrapped.images, atol=1e-5)
    assert loop.report.nfe == wrapped.report.nfe == loop.report.nfe_measured == wrapped.report.nfe_measured


# ---- attention map ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["kontext", "qwen"])
def test_attention_capture_reproduces_the_models_own_attention(family, request):
    """The recomputed text->image probabilities, applied to the values, give the attention output the model itself
    computed for the text tokens (so the map is the model's attention, not an approximation)."""
    pipe = request.getfixturevalue(family)
    kw = kontext_kwargs(pipe, steps=2) if family == "kontext" else qwen_kwargs(steps=2, true_cfg=1.0)
    attn = double_stream_attentions(pipe.transformer)[0]
    got, hs = {}, []

    def keep(name, value):  # first pass of the first step only; hooks return None (outputs untouched)
        got.setdefault(name, value)

    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k", "to_v", "add_v_proj"):
        hs.append(getattr(attn, name).register_forward_hook(lambda m, a, o, n=name: keep(n, o)))
    hs.append(attn.to_add_out.register_forward_hook(lambda m, a, o: keep("txt_out", a[0])))
    hs.append(attn.register_forward_pre_hook(lambda m, a, k: keep("kw", k), with_kwargs=True))
    try:
        pipe(**kw, generator=_gen(0))
    finally:
        for h in hs:
            h.remove()
    mask = got["kw"].get("encoder_hidden_states_mask")
    rope = got["kw"].get("image_rotary_emb")
    q, kt, ki = got["norm_added_q"], got["norm_added_k"], got["norm_k"]
    heads, d = q.shape[2], q.shape[3]
    v_txt = got["add_v_proj"].unflatten(-1, (heads, d))
    v_img = got["to_v"].unflatten(-1, (heads, d))
    # full probabilities of the text queries, rebuilt with the capture's own RoPE handling
    from diffusers_ext.verilatent.attention import _rope

    qr, ktr, kir = _rope(q, kt, ki, rope)
    logits = torch.einsum("bqhd,bkhd->bhqk", qr.float(), torch.cat([ktr, kir], 1).float()) / d ** 0.5
    if mask is not None:
        key_ok = torch.cat([mask.bool(), torch.ones(mask.shape[0], ki.shape[1], dtype=torch.bool)], 1)
        logits = logits.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    p = logits.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, torch.cat([v_txt, v_img], 1).float()).flatten(2)
    valid = slice(None) if mask is None else mask[0].bool()
    assert torch.allclose(out[:, valid], got["txt_out"][:, valid].float(), atol=1e-4)
    amap = text_to_image_attention(q, kt, ki, rope, mask)
    ref = p[..., q.shape[1]:]
    if mask is not None:
        ref = ref[:, :, mask[0].bool()]
    assert torch.allclose(amap, ref.mean(dim=(1, 2)), atol=1e-5)


def test_attention_map_costs_no_extra_model_pass_and_keeps_budget_one_exact(kontext):
    kw = kontext_kwargs(kontext)
    plain = kontext(**kw, generator=_gen(1)).images
    out = VeriLatentSearch(kontext, VeriLatentConfig(activation="attention"))(**kw, generator=_gen(1))
    assert np.array_equal(out.images, plain) and out.report.attention.shape == (1, 64)
    r = VeriLatentSearch(kontext, VeriLatentConfig.fixed(4, k=2, activation="mix"))(**kw, seed=1).report
    assert r.nfe == r.nfe_measured == 4 * 2 + 4 and r.attention.shape == (4, 64)
    assert float(r.attention.min()) >= 0


# ---- bad input and restoration ------------------------------------------------------------------------------------

def test_bad_inputs_get_clear_errors_and_leave_the_pipeline_as_it_was(kontext):
    kw = kontext_kwargs(kontext)
    before = _scheduler_state(kontext)
    search = VeriLatentSearch(kontext, VeriLatentConfig.adaptive(k=2))
    with pytest.raises(EditSteerConfigError, match="outside the schedule"):
        search(**kontext_kwargs(kontext, steps=2), seed=0)
    with pytest.raises(EditSteerConfigError, match="mask of size"):
        search(**kw, seed=0, mask=np.ones((30, 30)))
    with pytest.raises(EditSteerConfigError, match="latents="):
        search(**kw, latents=torch.zeros(1, 64, 16))
    with pytest.raises(EditSteerConfigError, match="one image per call"):
        search(**dict(kw, prompt=["a", "b"]))
    with pytest.raises(EditSteerConfigError, match="top_m"):
        search(**kw, num_images_per_prompt=2)
    with pytest.raises(EditSteerConfigError, match="N < 1"):
        VeriLatentSearch(kontext, VeriLatentConfig(n0=0))
    with pytest.raises(EditSteerConfigError, match="VeriLatentConfig"):
        VeriLatentSearch(kontext, {"n0": 4})
    _same_state(before, _scheduler_state(kontext))
    assert not kontext.transformer._forward_pre_hooks and not kontext.transformer._forward_hooks


def test_a_pipeline_that_is_not_flow_matching_is_refused(kontext):
    from diffusers import EulerDiscreteScheduler

    sched = kontext.scheduler
    kontext.scheduler = EulerDiscreteScheduler()
    try:
        with pytest.raises(ModelFamilyError, match="flow-matching"):
            VeriLatentSearch(kontext, VeriLatentConfig.adaptive())
    finally:
        kontext.scheduler = sched
    with pytest.raises(ModelFamilyError, match="flow-matching"):
        VeriLatentSearch(object(), VeriLatentConfig.adaptive())


@pytest.mark.parametrize("phase", ["rollout", "finish"])
def test_scheduler_interrupt_flag_and_hooks_are_restored_after_an_error(kontext, phase):
    kw = kontext_kwargs(kontext)
    plain = kontext(**kw, generator=_gen(0)).images  # a plain call leaves its schedule in the scheduler
    before = _scheduler_state(kontext)
    kontext._interrupt = False
    fail_at = 0 if phase == "rollout" else 3  # global step index: the resumed call starts at k = 2

    def boom(p, i, t, k):
        if i == fail_at and (phase == "rollout" or p.scheduler.sigmas.shape[0] < 7):
            raise RuntimeError("user callback failed")
        return k

    cfg = VeriLatentConfig.fixed(2, k=2, activation="mix")
    with pytest.raises(RuntimeError, match="user callback failed"):
        VeriLatentSearch(kontext, cfg)(**kw, seed=0, callback_on_step_end=boom)
    _same_state(before, _scheduler_state(kontext))
    assert kontext._interrupt is False
    assert not kontext.transformer._forward_pre_hooks and not kontext.transformer._forward_hooks
    for a in double_stream_attentions(kontext.transformer):
        assert not a._forward_hooks and not a._forward_pre_hooks and not a.norm_q._forward_hooks
    # and the pipeline still gives the plain result afterwards
    assert np.array_equal(kontext(**kw, generator=_gen(0)).images, plain)


def test_user_callback_sees_global_step_indices_and_an_interrupt_ends_the_search(kontext):
    kw = kontext_kwargs(kontext)
    steps = []

    def record(p, i, t, k):
        steps.append(i)
        return k

    run_verilatent(kontext, VeriLatentConfig.fixed(2, k=2), seed=0, callback_on_step_end=record, **kw)
    assert steps == [0, 1, 2, 3, 4, 5]

    def stop(p, i, t, k):
        p._interrupt = True
        return k

    out = run_verilatent(kontext, VeriLatentConfig.fixed(2, k=2), seed=0, callback_on_step_end=stop, **kw)
    assert out.images is None and out.report.interrupted
    assert kontext.__dict__.get("_interrupt", False) is False


# ---- pipeline subclasses (the Inline Critic's shape: own processors inside, extra call arguments) -----------------

class _ScaledProcessor:
    """A non-default processor that changes the model's output (a stand-in for a steering processor)."""

    def __init__(self, inner, scale):
        self.inner, self.scale = inner, scale

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        return tuple(o * self.scale for o in out) if isinstance(out, tuple) else out * self.scale


def test_search_drives_a_pipeline_subclass_with_its_own_processors_and_call_arguments(kontext):
    from diffusers import FluxKontextPipeline

    class SteeredKontext(FluxKontextPipeline):
        @torch.no_grad()
        def __call__(self, *args, steer: float = 1.0, **kwargs):
            for a in double_stream_attentions(self.transformer):
                a.processor.scale = steer
            return super().__call__(*args, **kwargs)

    pipe = SteeredKontext(**kontext.components)
    pipe.set_progress_bar_config(disable=True)
    originals = {name: p for name, p in pipe.transformer.attn_processors.items()}
    for a in double_stream_attentions(pipe.transformer):
        a.set_processor(_ScaledProcessor(a.processor, 1.0))
    try:
        kw = kontext_kwargs(pipe, steer=0.7)
        plain = pipe(**kw, generator=_gen(2)).images
        assert not np.allclose(plain, pipe(**kontext_kwargs(pipe, steer=1.0), generator=_gen(2)).images)
        assert np.array_equal(VeriLatentSearch(pipe)(**kw, generator=_gen(2)).images, plain)
        out = VeriLatentSearch(pipe, VeriLatentConfig.adaptive(k=2, n_max=8, **HARD))(**kw, seed=2)
        straight = pipe(**kw, generator=_gen(out.report.chosen_seeds[0])).images[0]
        assert np.abs(out.images[0] - straight).max() <= 1e-5
        assert all(isinstance(a.processor, _ScaledProcessor) for a in double_stream_attentions(pipe.transformer))
    finally:
        pipe.transformer.set_attn_processor(originals)

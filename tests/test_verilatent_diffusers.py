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


# ---- stacked on the Inline Critic (critic inside, verifier outside: methods.md §5) --------------------------------

def _critic_kontext(tiny_kontext_dir, mode):
    """A fresh InlineCriticKontextPipeline on the tiny Kontext weights with a random critic whose steering visibly
    changes the output; its forward pre-hook appends critic rows to the transformer's text stream."""
    from diffusers_ext.critic import InlineCritic, InlineCriticKontextPipeline, critic_config_for

    pipe = InlineCriticKontextPipeline.from_pretrained(tiny_kontext_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    critic = InlineCritic(critic_config_for(pipe.transformer, l_in=0, l_c=(1,), mode=mode))
    g = _gen(0)
    with torch.no_grad():
        for a in critic.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 2.0)
    pipe.load_critic(critic, mode=mode)
    return pipe, critic.config.n_tokens


@pytest.mark.parametrize("mode", ["critique", "steer"])
def test_search_stacked_on_the_inline_critic_resumes_exactly_and_encodes_once(kontext, tiny_kontext_dir, mode):
    """The critic's pre-hook extends the text stream inside every transformer call; the prompt embeddings reused by
    later calls must be the pipeline's own (not the extended stream, which would grow by the critic's rows on every
    call). Critique mode does not change the image, so the whole search equals the search without a critic."""
    pipe, n_c = _critic_kontext(tiny_kontext_dir, mode)
    kw = kontext_kwargs(pipe)
    n_txt = kw["max_sequence_length"]
    rows, t5 = [], []
    hooks = [pipe.transformer.register_forward_pre_hook(  # registered after the critic's: sees its rows
        lambda m, a, k: rows.append(k["encoder_hidden_states"].shape[1]), with_kwargs=True),
        pipe.text_encoder_2.register_forward_pre_hook(lambda m, a: t5.append(1))]
    cfg = VeriLatentConfig.fixed(4, k=2)  # the default mixed map: the critic's rows are no instruction tokens
    try:
        out = VeriLatentSearch(pipe, cfg)(**kw, seed=5)
    finally:
        for h in hooks:
            h.remove()
    r = out.report
    assert set(rows) == {n_txt + n_c} and len(t5) == 1
    straight = pipe(**kw, generator=_gen(r.chosen_seeds[0])).images[0]
    assert np.abs(out.images[0] - straight).max() <= 1e-5
    if mode == "critique":
        ref = VeriLatentSearch(kontext, cfg)(**kw, seed=5)  # the same weights, no critic
        assert r.chosen_seeds == ref.report.chosen_seeds
        assert np.allclose(r.scores, ref.report.scores, atol=1e-6)
        assert np.abs(out.images[0] - ref.images[0]).max() <= 1e-5
    assert np.array_equal(VeriLatentSearch(pipe)(**kw, generator=_gen(3)).images,
                          pipe(**kw, generator=_gen(3)).images)


def _text_qwen_class(base):
    """``base`` (a Qwen edit pipeline class) with a stand-in for the Qwen2.5-VL text encoder (the tiny pipeline has
    none): deterministic padded embeddings per prompt, counting how often a prompt is encoded."""

    class TextQwen(base):
        encoded: list = []

        def _get_qwen_prompt_embeds(self, prompt, image=None, device=None, dtype=None):
            prompt = [prompt] if isinstance(prompt, str) else prompt
            type(self).encoded.extend(prompt)
            seed = sum(map(ord, prompt[0]))
            g = _gen(seed)
            emb = torch.randn(len(prompt), 7, 16, generator=g)
            mask = torch.ones(len(prompt), 7, dtype=torch.long)
            mask[:, 5:] = 0
            return emb, mask

    return TextQwen


def test_qwen_encodes_the_prompts_once_per_search_and_stacks_on_the_critic(qwen):
    """Qwen-Image-Edit reuses what encode_prompt returned (prompt and negative, with their masks) from the second
    call on, also with the Inline Critic's hook extending the text stream and its mask; results stay exact."""
    from diffusers_ext.critic import InlineCritic, InlineCriticQwenEditPipeline, critic_config_for

    cls = _text_qwen_class(InlineCriticQwenEditPipeline)
    pipe = cls(**qwen.components)
    pipe.set_progress_bar_config(disable=True)
    kw = qwen_kwargs(steps=5, true_cfg=4.0)
    for name in ("prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"):
        kw.pop(name)
    kw.update(prompt="make the square red", negative_prompt="blurry")
    cfg = VeriLatentConfig.adaptive(k=2, n_max=8, **HARD)
    cls.encoded.clear()
    ref = VeriLatentSearch(pipe, cfg)(**kw, seed=4)  # no critic loaded yet
    assert cls.encoded == ["make the square red", "blurry"]  # once each, for 3 pipeline calls
    assert ref.report.passes_per_step == 2 and ref.report.nfe == ref.report.nfe_measured == (8 * 2 + 3) * 2
    torch.manual_seed(0)
    pipe.load_critic(InlineCritic(critic_config_for(pipe.transformer, l_in=0, l_c=(1,), mode="critique")))
    try:
        out = VeriLatentSearch(pipe, cfg)(**kw, seed=4)
        straight = pipe(**kw, generator=_gen(out.report.chosen_seeds[0])).images[0]
    finally:
        pipe.unload_critic()
    assert np.abs(out.images[0] - straight).max() <= 1e-5
    assert out.report.chosen_seeds == ref.report.chosen_seeds
    assert np.allclose(out.report.scores, ref.report.scores, atol=1e-6)
    assert np.abs(out.images[0] - ref.images[0]).max() <= 1e-5
    assert "encode_prompt" not in pipe.__dict__  # the recording wrapper is gone


# ---- budget 1: the step-k map is optional -------------------------------------------------------------------------

def test_budget_one_stays_the_plain_pipeline_when_no_step_k_map_can_be_made(kontext):
    """FluxKontextPipeline renders at height x width whatever the source's aspect, and runs without an image: the
    plain call works, so budget 1 must too (no map, the reason in the report). A search needs the map: clear error."""
    wide = kontext_kwargs(kontext, height=32, width=64, max_area=32 * 64)  # a 32x32 source, a 32x64 output
    no_image = {k: v for k, v in kontext_kwargs(kontext).items() if k != "image"}
    for kw, why in ((wide, "differ in aspect"), (no_image, "source image's latent tokens")):
        plain = kontext(**kw, generator=_gen(0)).images
        out = VeriLatentSearch(kontext)(**kw, generator=_gen(0))
        assert np.array_equal(out.images, plain)
        assert out.report.maps() == {} and len(out.report.notes) == 1 and why in out.report.notes[0]
        assert out.report.to_json()["notes"] == out.report.notes and out.report.nfe == out.report.nfe_measured == 6
    with pytest.raises(EditSteerConfigError, match="pass height= and width="):
        VeriLatentSearch(kontext, VeriLatentConfig.fixed(2, k=2))(**wide, seed=0)
    # a mask that does not fit the grid only costs the map at budget 1
    kw = kontext_kwargs(kontext)
    out = VeriLatentSearch(kontext)(**kw, generator=_gen(1), mask=np.ones((30, 30)))
    assert np.array_equal(out.images, kontext(**kw, generator=_gen(1)).images)
    assert "mask of size" in out.report.notes[0]


# ---- verifier time ------------------------------------------------------------------------------------------------

def test_attention_recomputation_inside_the_model_call_counts_as_verifier_time(kontext, monkeypatch):
    """The mixed map's text->image attention is recomputed in hooks inside the transformer's forward: it is verifier
    work, so the report's verify_s includes it (capture_s) and a model timer can take it out of model time."""
    import time

    from diffusers_ext.verilatent import attention as att_mod
    from diffusers_ext.verilatent.bench import ModelTimer

    delay, calls = 0.05, []
    real = att_mod.text_to_image_attention

    def slow(*a, **k):  # the real computation, made measurably slow
        calls.append(1)
        time.sleep(delay)
        return real(*a, **k)

    monkeypatch.setattr(att_mod, "text_to_image_attention", slow)
    timer = ModelTimer(kontext)
    try:
        r = VeriLatentSearch(kontext, VeriLatentConfig.fixed(2, k=2, activation="mix"))(
            **kontext_kwargs(kontext, output_type="latent"), seed=0).report
    finally:
        timer.close()
    hooked = len(calls) * delay
    assert len(calls) == 2  # one double-stream block, k = 2 conditional passes
    assert hooked <= r.capture_s <= r.verify_s < r.wall_s
    assert timer.seconds - r.capture_s < 0.5 * hooked  # what is left is the model's own time
    assert r.to_json()["capture_s"] == r.capture_s
    lat = VeriLatentSearch(kontext, VeriLatentConfig.fixed(2, k=2, activation="latent"))(
        **kontext_kwargs(kontext, output_type="latent"), seed=0).report
    assert lat.capture_s == 0.0 and len(calls) == 2

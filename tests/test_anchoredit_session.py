"""AnchorEdit sampling and sessions: per-turn seeds, save/load, undo, bad inputs leave the session unchanged."""

import json

import numpy as np
import pytest
import torch

from fixtures_anchoredit import small_pipeline

from diffusers_ext.anchoredit import AnchorEditSession, SamplerConfig
from diffusers_ext.anchoredit.sampling import sample_distilled, sample_flow, shifted_sigmas
from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError
from diffusers_ext.toy import world as W

SEQ = W.make_sequence("heldout", seed=0, index=1, turns=6)


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline()


def _state(s):
    """Everything a session is, for before/after comparisons."""
    tensors, meta = s.cache.state_dict()
    return (list(s.instructions), list(s.seeds), [x.clone() for x in s.latents], [i.copy() for i in s.images],
            {k: v.clone() for k, v in tensors.items()}, json.dumps(meta, sort_keys=True))


def _same(a, b):
    return (a[0] == b[0] and a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
            and len(a[2]) == len(b[2]) and all(np.array_equal(x, y) for x, y in zip(a[3], b[3]))
            and a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4]) and a[5] == b[5])


def test_samplers_follow_their_schedules():
    target = torch.randn(1, 4, 1, 4, 4)

    def oracle(x, t):  # the exact flow towards `target` from wherever x is
        s = t / 1000
        return (x - target) / s

    g = torch.Generator().manual_seed(3)
    assert torch.allclose(sample_distilled(oracle, target.shape, (1000, 750, 500, 250), g), target, atol=1e-5)
    assert torch.allclose(sample_flow(oracle, target.shape, 8, 3.0, torch.Generator().manual_seed(1)), target,
                          atol=1e-4)
    sig = shifted_sigmas(10, 8.0)
    assert sig[0] == 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    seen = []
    sample_distilled(lambda x, t: seen.append(t) or torch.zeros_like(x), target.shape, (1000, 750, 500, 250),
                     torch.Generator().manual_seed(0))
    assert seen == [1000.0, 750.0, 500.0, 250.0]


def test_per_turn_seeds_reproduce(pipe):
    a = pipe.start_session(SEQ.source, seed=5)
    b = pipe.start_session(SEQ.source, seed=5)
    c = pipe.start_session(SEQ.source, seed=6)
    for text in SEQ.instructions[:2]:
        ia, ib, ic = (s.edit(text, output_type="np") for s in (a, b, c))
        assert np.array_equal(ia, ib)
    assert not all(torch.equal(x, y) for x, y in zip(a.latents[1:], c.latents[1:]))
    assert a.seeds == [5 + 7919, 5 + 2 * 7919]
    d = pipe.start_session(SEQ.source, seed=0)
    d.edit(SEQ.instructions[0], seed=5 + 7919)  # an explicit turn seed reproduces the same turn
    assert torch.equal(d.latents[1], a.latents[1])


def test_save_load_round_trip_continues_identically(pipe, tmp_path):
    s = pipe.start_session(SEQ.source, seed=2)
    for text in SEQ.instructions[:4]:
        s.edit(text)
    st, js = s.save(tmp_path / "sess")
    assert st.name == "sess.safetensors" and js.name == "sess.json"
    meta = json.loads(js.read_text())
    assert meta["instructions"] == SEQ.instructions[:4] and meta["seed"] == 2
    loaded = AnchorEditSession.load(pipe, tmp_path / "sess.json")
    rebuilt_src = s.fork()
    s.save(tmp_path / "nocache", include_cache=False)
    rebuilt = AnchorEditSession.load(pipe, tmp_path / "nocache")
    assert [t.instruction for t in loaded.history] == SEQ.instructions[:4]
    assert np.array_equal(loaded.image, s.image)
    nxt = SEQ.instructions[4]
    ref = s.edit(nxt, output_type="np")
    assert np.array_equal(loaded.edit(nxt, output_type="np"), ref)
    assert np.allclose(rebuilt.edit(nxt, output_type="np").astype(int), ref.astype(int), atol=1)
    assert rebuilt_src.turns == 4  # fork is independent of the session it came from


def test_undo_exact_and_beyond_the_kept_evictions(pipe):
    s = pipe.start_session(SEQ.source, seed=1)
    for text in SEQ.instructions[:5]:
        s.edit(text)
    ref = pipe.start_session(SEQ.source, seed=1)
    for text in SEQ.instructions[:2]:
        ref.edit(text)
    img = s.undo(3, output_type="np")  # window 2 + undo_depth 2: the third undo must rebuild the cache
    assert s.turns == 2 and np.array_equal(img, ref.image) and s.cache.frames == ref.cache.frames
    a = s.edit(SEQ.instructions[2], output_type="np")
    b = ref.edit(SEQ.instructions[2], output_type="np")
    assert np.allclose(a.astype(int), b.astype(int), atol=1)
    s.undo()
    assert s.turns == 2 and s.cache.next_frame == 3
    with pytest.raises(EditSteerConfigError, match="cannot undo"):
        s.undo(5)


def test_bad_inputs_leave_the_session_unchanged(pipe, tmp_path):
    s = pipe.start_session(SEQ.source, seed=0)
    s.edit(SEQ.instructions[0])
    before = _state(s)
    with pytest.raises(EditSteerConfigError):
        s.edit(["not", "a", "string"])
    with pytest.raises(EditSteerConfigError):
        s.edit("x", output_type="jpeg")

    def interrupt(step, total, x0):
        if step == 2:
            raise KeyboardInterrupt("user pressed cancel")

    with pytest.raises(KeyboardInterrupt):
        s.edit(SEQ.instructions[1], callback=interrupt)
    assert _same(before, _state(s))
    for text in ["a"] * (pipe.anchoredit_config.max_turns - 1):
        s.edit(text)
    full = _state(s)
    with pytest.raises(EditSteerConfigError, match="max_turns"):
        s.edit("one turn too many")
    assert _same(full, _state(s))
    with pytest.raises(EditSteerConfigError, match="patch grid"):
        pipe.start_session(np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(EditSteerConfigError, match="max_turns"):
        pipe(SEQ.source, ["x"] * (pipe.anchoredit_config.max_turns + 1))


def test_session_file_from_another_model_is_refused(pipe, tmp_path):
    s = pipe.start_session(SEQ.source, seed=0)
    s.edit(SEQ.instructions[0])
    s.save(tmp_path / "a")
    other = small_pipeline(seed=1)  # same architecture, other weights
    with pytest.raises(ModelFamilyError, match="another model"):
        AnchorEditSession.load(other, tmp_path / "a")
    kept = AnchorEditSession.load(other, tmp_path / "a", allow_other_model=True)  # images kept, memory recomputed
    assert np.array_equal(kept.image, s.image) and kept.cache.frames == s.cache.frames
    wider = small_pipeline(window=3)
    with pytest.raises(EditSteerConfigError, match="settings"):
        AnchorEditSession.load(wider, tmp_path / "a")
    s2 = pipe.start_session(SEQ.source, seed=0)
    s2.save(tmp_path / "b")
    (tmp_path / "a.safetensors").replace(tmp_path / "b.safetensors")  # mismatched pair
    with pytest.raises(EditSteerConfigError, match="sha256"):
        AnchorEditSession.load(pipe, tmp_path / "b")
    with pytest.raises(EditSteerConfigError, match="no session"):
        AnchorEditSession.load(pipe, tmp_path / "missing")


def test_cfg_flow_session_and_one_shot_call(pipe):
    sampler = SamplerConfig.flow(steps=3, shift=3.0, guidance_scale=2.0)
    s = pipe.start_session(SEQ.source, seed=0, sampler=sampler)
    s.edit(SEQ.instructions[0])
    assert s.batch == 2 and s.cache.layout.batch == 2
    out = pipe(SEQ.source, SEQ.instructions[:2], seed=0, output_type="np")
    assert len(out.images) == 2 and out.images[0].shape == (32, 32, 3) and out.session.turns == 2


def _cache_state(cache):
    tensors, meta = cache.state_dict()
    return {k: v.clone() for k, v in tensors.items()}, json.dumps(meta, sort_keys=True)


def _same_cache(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["plain", "cfg"])
def test_fork_can_take_the_cache_and_the_parent_rebuilds_it_exactly(pipe, guidance):
    """ComfyUI keeps every turn node's output session, so a chain of forks that each clone the cache holds one
    whole cache per turn. ``fork(take_cache=True)`` hands the cache over; the parent keeps its turns and, if used
    again, rebuilds the same keys and values from its latents."""
    sampler = SamplerConfig.flow(steps=2, shift=3.0, guidance_scale=guidance)
    s = pipe.start_session(SEQ.source, seed=4, sampler=sampler)
    for text in SEQ.instructions[:4]:  # window 2: the cache has evicted and keeps undo copies
        s.edit(text)
    before, ref = _state(s), s.fork()
    child = s.fork(take_cache=True)
    assert not s.holds_cache and s.cache_bytes() == 0 and child.holds_cache
    assert child.cache_bytes() == ref.cache_bytes() > 0
    img = child.edit(SEQ.instructions[4], output_type="np")
    assert np.array_equal(img, ref.edit(SEQ.instructions[4], output_type="np"))
    assert _same(before, _state(s)) and s.holds_cache  # rebuilt on access: bit for bit what it held
    again = s.fork(take_cache=True)
    again.undo(3)  # an undo beyond the kept evictions, on a session whose cache was handed over
    ref.undo(4)
    assert again.turns == ref.turns == 1
    assert np.array_equal(again.edit("a", output_type="np"), ref.edit("a", output_type="np"))
    s.undo(2)  # a session without its cache just forgets turns; the rebuild happens when it is used
    assert not s.holds_cache and s.turns == 2 and "rebuilt when needed" in repr(s)
    assert s.cache.next_frame == 3 and s.holds_cache


def _fingerprint_format1(pipe):
    """The fingerprint that session files of format 1 carry: probes hashed in their own dtype (as float32)."""
    import hashlib

    h = hashlib.sha256()
    for module in (pipe.transformer, pipe.vae):
        h.update(type(module).__name__.encode())
        h.update(json.dumps({k: v for k, v in dict(module.config).items() if not k.startswith("_")},
                            sort_keys=True, default=str).encode())
    tr = pipe.transformer
    for p in (tr.scale_shift_table, tr.proj_out.bias, tr.patch_embedding.bias, tr.blocks[0].scale_shift_table,
              tr.blocks[-1].ffn.net[-1].bias):
        h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(str(pipe.text_encoder.config.to_dict().get("d_model")).encode())
    return h.hexdigest()[:16]


def _as_format1(js, fingerprint):
    meta = json.loads(js.read_text())
    meta.update(format_version=1, model_fingerprint=fingerprint, editsteer_version="0.0.0")
    js.write_text(json.dumps(meta))


def test_a_session_moves_between_float32_and_bfloat16_of_one_model(pipe, tmp_path):
    """ComfyUI runs the model in bf16 on a GPU, diffusers users often in fp32: one model, one fingerprint. A really
    different model is still refused, and format-1 files (dtype-dependent fingerprints) still load where they can."""
    from diffusers_ext.anchoredit import AnchorEditPipeline
    from diffusers_ext.anchoredit.session import model_fingerprint

    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    f32 = AnchorEditPipeline.from_toy(folder)
    b16 = AnchorEditPipeline.from_toy(folder, dtype=torch.bfloat16)
    cast = AnchorEditPipeline.from_toy(folder).to(torch.bfloat16)  # what the ComfyUI loader used to make
    tr = b16.transformer  # from_pretrained(dtype=...) keeps diffusers' fp32 modules in fp32
    assert tr.proj_out.weight.dtype == torch.bfloat16 and tr.scale_shift_table.dtype == torch.float32
    assert tr.rope.freqs_cos.dtype == torch.float32 and tr.blocks[0].norm2.weight.dtype == torch.float32
    assert len({model_fingerprint(p) for p in (pipe, f32, b16, cast)}) == 1

    a = f32.start_session(SEQ.source, seed=3)
    a.edit(SEQ.instructions[0])
    a.save(tmp_path / "f32")
    b = b16.start_session(SEQ.source, seed=3)
    b.edit(SEQ.instructions[0])
    b.save(tmp_path / "b16")
    into_b16 = AnchorEditSession.load(b16, tmp_path / "f32")
    into_f32 = AnchorEditSession.load(f32, tmp_path / "b16")
    assert into_b16.cache.layout.dtype == torch.bfloat16 and into_f32.cache.layout.dtype == torch.float32
    assert np.array_equal(into_f32.image, b.image) and into_b16.turns == into_f32.turns == 1
    ref = b.fork().edit(SEQ.instructions[1], output_type="np")
    got = into_b16.edit(SEQ.instructions[1], output_type="np")  # fp32 history, bf16 turn: close to all-bf16
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 2
    with pytest.raises(ModelFamilyError, match="another model"):
        AnchorEditSession.load(small_pipeline(seed=1), tmp_path / "f32")

    _as_format1(tmp_path / "f32.json", _fingerprint_format1(f32))
    assert AnchorEditSession.load(f32, tmp_path / "f32").turns == 1
    with pytest.raises(ModelFamilyError, match="dtype"):  # fp32 probes cannot be recovered from bf16 weights
        AnchorEditSession.load(b16, tmp_path / "f32")
    _as_format1(tmp_path / "b16.json", _fingerprint_format1(cast))  # saved by the old ComfyUI loader's model
    assert AnchorEditSession.load(f32, tmp_path / "b16").turns == 1
    _as_format1(tmp_path / "b16.json", _fingerprint_format1(b16))
    assert AnchorEditSession.load(f32, tmp_path / "b16").turns == 1
    assert AnchorEditSession.load(b16, tmp_path / "b16").turns == 1


def test_loading_into_another_model_encodes_the_instructions_with_it(pipe, tmp_path):
    """With ``allow_other_model`` the memory is recomputed with the new model, so its instruction embeddings (and
    the empty and negative prompts) must be the new text encoder's, not the old model's stored ones."""
    sampler = SamplerConfig.flow(steps=2, shift=3.0, guidance_scale=2.0)
    s = pipe.start_session(SEQ.source, seed=0, sampler=sampler)
    for text in SEQ.instructions[:2]:
        s.edit(text)
    s.save(tmp_path / "a")
    other = small_pipeline(seed=1)
    kept = AnchorEditSession.load(other, tmp_path / "a", allow_other_model=True)
    assert torch.equal(kept.embeds[0], other.encode_instructions([""]))
    for text, emb in zip(SEQ.instructions[:2], kept.embeds[1:]):
        assert torch.equal(emb, other.encode_instructions([text]))
    assert torch.equal(kept._neg, other.encode_instructions([sampler.negative_prompt]))
    assert not torch.equal(kept.embeds[1], s.embeds[1])
    assert _same_cache(_cache_state(kept.cache), _cache_state(kept._build_cache(3)))  # built from these

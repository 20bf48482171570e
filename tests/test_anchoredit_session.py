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

"""AnchorEdit on diffusers' Wan transformer: causal attention, KV cache, strided RoPE, apply/remove."""

import pytest
import torch

from fixtures_anchoredit import WAN, inputs, wan

from diffusers_ext.anchoredit import (
    AnchorEditConfig,
    AnchorKVCache,
    anchoredit_forward,
    apply_anchoredit,
    remove_anchoredit,
)
from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError

CONFIGS = [
    AnchorEditConfig(window=None),  # full cache
    AnchorEditConfig(sink=1, window=2),  # the anchor + a window
    AnchorEditConfig(sink=0, window=2),  # no anchor
    AnchorEditConfig(sink=2, window=1),
]


@pytest.fixture(scope="module")
def model():
    return wan()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"sink{c.sink}-win{c.window}")
def test_incremental_cached_decoding_equals_full_causal_forward(model, cfg):
    frames = 7
    x, t, ctx = inputs(frames)
    runtime = apply_anchoredit(model, cfg)
    try:
        with torch.no_grad():
            cache = runtime.new_cache()
            inc = torch.cat([anchoredit_forward(model, x[:, :, i:i + 1], t[:, i:i + 1], ctx[:, i:i + 1], cache=cache,
                                                write=True) for i in range(frames)], 2)
            for mode in ("mask", "loop"):
                runtime.config = cfg.replace(causal_attention=mode)
                full = anchoredit_forward(model, x, t, ctx)
                assert (full - inc).abs().max().item() <= 1e-5, mode
            # frame-causal: changing a later frame leaves earlier outputs untouched, changes later ones
            x2 = x.clone()
            x2[:, :, 4] += 1.0
            full2 = anchoredit_forward(model, x2, t, ctx)
        assert torch.equal(full2[:, :, :4], full[:, :, :4])
        assert not torch.allclose(full2[:, :, 5:], full[:, :, 5:])
    finally:
        remove_anchoredit(model)


def test_each_frame_reads_only_its_own_instruction(model):
    x, t, ctx = inputs(4)
    apply_anchoredit(model, AnchorEditConfig())
    try:
        with torch.no_grad():
            ref = anchoredit_forward(model, x, t, ctx)
            ctx2 = ctx.clone()
            ctx2[:, 2] = torch.randn_like(ctx2[:, 2])  # another instruction for frame 2 only
            out = anchoredit_forward(model, x, t, ctx2)
        assert torch.equal(out[:, :, :2], ref[:, :, :2])
        assert not torch.allclose(out[:, :, 2], ref[:, :, 2])
    finally:
        remove_anchoredit(model)


def test_single_frame_equals_the_plain_wan_forward(model):
    x, t, ctx = inputs(1)
    with torch.no_grad():
        plain = model(x, t[:, 0], ctx[:, 0], return_dict=False)[0]
        runtime = apply_anchoredit(model, AnchorEditConfig(rope_stride=4))
        try:
            for timestep in (t[:, 0], t):  # [B] and per-frame [B, 1]
                out = anchoredit_forward(model, x, timestep, ctx)
                assert (out - plain).abs().max().item() <= 1e-6
            cached = anchoredit_forward(model, x, t, ctx, cache=runtime.new_cache(), write=True)
            assert (cached - plain).abs().max().item() <= 1e-6
        finally:
            remove_anchoredit(model)


def test_temporal_rope_is_strided(model):
    x, t, ctx = inputs(3)
    outs = []
    for stride in (1, 4):
        apply_anchoredit(model, AnchorEditConfig(rope_stride=stride))
        with torch.no_grad():
            outs.append(anchoredit_forward(model, x, t, ctx))
        remove_anchoredit(model)
    assert torch.equal(outs[0][:, :, 0], outs[1][:, :, 0])  # frame 0 sits at position 0 either way
    assert not torch.allclose(outs[0][:, :, 2], outs[1][:, :, 2])


def test_remove_restores_the_model_exactly(model):
    x, t, ctx = inputs(3)
    with torch.no_grad():
        before = model(x, t[:, 0], ctx[:, 0], return_dict=False)[0]
    procs = dict(model.attn_processors)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_anchoredit(model, AnchorEditConfig())
    assert "forward" in model.__dict__
    assert remove_anchoredit(model) is True
    assert remove_anchoredit(model) is False
    assert all(model.attn_processors[k] is v for k, v in procs.items())
    assert "forward" not in model.__dict__ and not hasattr(model, "_diffusers_hook")
    assert not hasattr(model.rope, "_diffusers_hook")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        after = model(x, t[:, 0], ctx[:, 0], return_dict=False)[0]
    assert torch.equal(before, after)


def test_apply_refuses_bad_models_and_configs_without_changing_them(model):
    procs = dict(model.attn_processors)
    with pytest.raises(ModelFamilyError):
        apply_anchoredit(torch.nn.Linear(2, 2), AnchorEditConfig())
    with pytest.raises(ModelFamilyError, match="image-conditioning"):
        apply_anchoredit(_i2v(), AnchorEditConfig())
    with pytest.raises(EditSteerConfigError, match="rope_max_seq_len"):
        apply_anchoredit(model, AnchorEditConfig(max_turns=40, rope_stride=4))  # 160 positions > 128
    assert all(model.attn_processors[k] is v for k, v in procs.items()) and "forward" not in model.__dict__
    apply_anchoredit(model, AnchorEditConfig())
    try:
        with pytest.raises(EditSteerConfigError, match="already applied"):
            apply_anchoredit(model, AnchorEditConfig(window=1))
    finally:
        remove_anchoredit(model)


def _i2v():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=24, num_layers=1, image_dim=8,
                                 added_kv_proj_dim=24, rope_max_seq_len=64)


@pytest.mark.parametrize("bad", [dict(sink=-1), dict(window=0), dict(rope_stride=0), dict(max_turns=0),
                                 dict(causal_attention="sparse"), dict(context_timestep=2000.0),
                                 dict(undo_depth=-1), dict(window=1.5)])
def test_config_validation(bad):
    with pytest.raises(EditSteerConfigError):
        AnchorEditConfig(**bad)


def test_bad_calls_are_clear_errors(model):
    runtime = apply_anchoredit(model, AnchorEditConfig(max_turns=3))
    try:
        x, t, ctx = inputs(5)
        with pytest.raises(EditSteerConfigError, match="max_turns"):
            anchoredit_forward(model, x, t, ctx)  # 5 frames = source + 4 turns > 3
        with pytest.raises(EditSteerConfigError, match="one frame"):
            anchoredit_forward(model, x[:, :, :2], t[:, :2], ctx[:, :2], cache=runtime.new_cache())
        with pytest.raises(EditSteerConfigError, match="patch grid"):
            anchoredit_forward(model, torch.randn(1, WAN.in_channels, 1, 5, 4), t[:1, :1], ctx[:1, :1])
        with pytest.raises(EditSteerConfigError, match="one instruction per frame"):
            anchoredit_forward(model, x[:, :, :2], t[:, :2], ctx[:, :3])
        cache = runtime.new_cache()
        anchoredit_forward(model, x[:, :, :1], t[:, :1], ctx[:, :1], cache=cache, write=True)
        with pytest.raises(EditSteerConfigError, match="batch"):  # a cache is tied to its batch and size
            anchoredit_forward(model, x[:1, :, 1:2], t[:1, 1:2], ctx[:1, 1:2], cache=cache)
        assert cache.frames == [0] and cache.next_frame == 1
    finally:
        remove_anchoredit(model)


def test_sink_is_never_evicted_window_bounded_memory_flat(model):
    cfg = AnchorEditConfig(sink=1, window=3, max_turns=20, undo_depth=1)
    runtime = apply_anchoredit(model, cfg)
    try:
        x, t, ctx = inputs(12, batch=1)
        cache = runtime.new_cache()
        sizes = []
        with torch.no_grad():
            for i in range(12):
                anchoredit_forward(model, x[:, :, i:i + 1], t[:, i:i + 1], ctx[:, i:i + 1], cache=cache, write=True)
                expected = sorted({0} | set(range(max(1, i - cfg.window + 1), i + 1)))
                assert cache.frames == expected  # the source stays; the oldest turn beyond the window goes
                assert len(cache.frames) <= cfg.sink + cfg.window and cache.capacity <= cfg.sink + cfg.window + 1
                sizes.append(cache.nbytes())
        assert cache.frames == [0, 9, 10, 11]
        assert len(set(sizes[5:])) == 1 and sizes[5] > sizes[0]  # grows until the window is full, then flat
        per_frame = 2 * len(model.blocks) * 1 * (4 // 2) ** 2 * WAN.num_attention_heads * WAN.attention_head_dim * 4
        assert sizes[-1] == per_frame * (cfg.sink + cfg.window + 1 + cfg.undo_depth)
    finally:
        remove_anchoredit(model)


def test_cache_undo_is_exact_and_bounded(model):
    cfg = AnchorEditConfig(sink=1, window=2, undo_depth=1)
    runtime = apply_anchoredit(model, cfg)
    try:
        x, t, ctx = inputs(6, batch=1)
        cache = runtime.new_cache()
        snaps = []
        with torch.no_grad():
            for i in range(6):
                snaps.append(cache.clone())
                anchoredit_forward(model, x[:, :, i:i + 1], t[:, i:i + 1], ctx[:, i:i + 1], cache=cache, write=True)
            probe = (x[:, :, 5:6], t[:, 5:6], ctx[:, 5:6])
            assert cache.can_pop(1) and not cache.can_pop(2)  # only the last eviction is kept (undo_depth=1)
            assert cache.truncate(4) is False and cache.next_frame == 6  # refused, unchanged
            cache.pop()
            assert cache.frames == snaps[5].frames and cache.next_frame == 5
            a = anchoredit_forward(model, *probe, cache=cache)
            b = anchoredit_forward(model, *probe, cache=snaps[5])
        assert torch.equal(a, b)
    finally:
        remove_anchoredit(model)


def test_cache_state_dict_round_trip(model):
    runtime = apply_anchoredit(model, AnchorEditConfig(sink=1, window=2))
    try:
        x, t, ctx = inputs(5, batch=1)
        cache = runtime.new_cache()
        with torch.no_grad():
            for i in range(4):
                anchoredit_forward(model, x[:, :, i:i + 1], t[:, i:i + 1], ctx[:, i:i + 1], cache=cache, write=True)
            tensors, meta = cache.state_dict()
            again = AnchorKVCache.from_state_dict(tensors, meta)
            probe = (x[:, :, 4:5], t[:, 4:5], ctx[:, 4:5])
            assert torch.equal(anchoredit_forward(model, *probe, cache=cache),
                               anchoredit_forward(model, *probe, cache=again))
        assert again.frames == cache.frames and again.can_pop(1)
    finally:
        remove_anchoredit(model)


def test_gradient_checkpointing_and_cached_gradients(model):
    """The call state rides with the rotary embedding, so recomputed blocks see the right frame layout."""
    x, t, ctx = inputs(4, batch=1)
    runtime = apply_anchoredit(model, AnchorEditConfig(window=2))
    try:
        grads = []
        for ckpt in (False, True):
            model.zero_grad()
            if ckpt:
                model.enable_gradient_checkpointing()
            anchoredit_forward(model, x, t, ctx).square().mean().backward()
            grads.append(model.proj_out.weight.grad.clone())
            model.disable_gradient_checkpointing()
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
        cache = runtime.new_cache()  # stage 3: gradients flow through a cached call (history constant)
        with torch.no_grad():
            anchoredit_forward(model, x[:, :, :1], t[:, :1], ctx[:, :1], cache=cache, write=True)
        model.zero_grad()
        anchoredit_forward(model, x[:, :, 1:2], t[:, 1:2], ctx[:, 1:2], cache=cache).square().mean().backward()
        assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad()
        remove_anchoredit(model)

"""Installing the Inline Critic on real (tiny) FLUX.1 Kontext and Qwen-Image transformers."""

import pytest
import torch
from fixtures_critic import flux_inputs, qwen_inputs, snapshot, strong_steering_, tiny_flux, tiny_qwen

from diffusers_ext.critic import (
    InlineCritic,
    apply_inline_critic,
    critic_config_for,
    installed_critic,
    remove_inline_critic,
)
from diffusers_ext.errors import EditSteerConfigError, EditSteerError, ModelFamilyError

FAMILIES = {"flux": (tiny_flux, flux_inputs), "qwen": (tiny_qwen, qwen_inputs)}


def _critic(t, **kw):
    torch.manual_seed(0)
    c = InlineCritic(critic_config_for(t, **{"l_in": 1, "adapter_rank": 2, **kw}))
    with torch.no_grad():
        c.tokens.mul_(50)
    return c


def _hooks(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    build, inputs = FAMILIES[request.param]
    t = build()
    return request.param, t, inputs(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modes_off_critique_steer_and_exact_removal(family, dtype):
    """off, critique and steer at scale 0 are the frozen model bit for bit, in bf16 too (where a different order
    of the attention's keys alone moves the output by ~1e-2). One thread: a multi-threaded float32 matrix product
    splits its work by row count, and Flux's text stream carries the critic rows (4.8e-7 on two threads)."""
    name, t, kw = family
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_modes(t, kw, dtype)
    finally:
        torch.set_num_threads(threads)


def _check_modes(t, kw, dtype):
    t = t.to(dtype)
    kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        ref = t(**kw)[0]
        procs = dict(t.attn_processors)
        handle = apply_inline_critic(t, _critic(t), mode="off")
        assert installed_critic(t) is handle
        assert torch.equal(t(**kw)[0], ref)  # off: bit for bit the frozen model

        handle.set_mode("critique")
        out = t(**kw)[0]
        assert torch.equal(out, ref)  # stage-2 masked mode: nothing attends to the critic
        call = handle.last_call
        assert call.error_map().shape == (2, 16) and call.grid == (4, 4)
        assert torch.isfinite(call.error_map()).all()

        handle.set_mode("steer")
        assert (t(**kw)[0] - ref).abs().max() > 1e-4  # stage 3: later blocks attend to the critic
        handle.set_mode("steer", scale=0.0)
        assert torch.equal(t(**kw)[0], ref)  # scale 0 = critique

        assert remove_inline_critic(t) and installed_critic(t) is None
        assert not remove_inline_critic(t)
        after = t.attn_processors
        assert after.keys() == procs.keys() and all(after[k] is procs[k] for k in procs)
        assert _hooks(t) == 0
        assert torch.equal(t(**kw)[0], ref)


def test_critic_output_does_not_depend_on_batch_neighbours(family):
    """Batch > 1 (and Qwen's text padding): each sample's output and map equal its own batch-of-1 run."""
    name, t, kw = family
    handle = apply_inline_critic(t, _critic(t), mode="steer")
    with torch.no_grad():
        full = t(**kw)[0]
        full_map = handle.last_call.error_map()
        one = {k: (v[1:2] if torch.is_tensor(v) and v.shape[0] == 2 and k not in ("img_ids", "txt_ids") else v)
               for k, v in kw.items()}
        if name == "qwen":
            one["img_shapes"] = kw["img_shapes"][:1]
        single = t(**one)[0]
        torch.testing.assert_close(single[0], full[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(handle.last_call.error_map()[0], full_map[1], atol=1e-5, rtol=0)
    remove_inline_critic(t)


def test_flux_image_ids_on_the_critics_rope_index_are_refused():
    """The critic's RoPE id is (3, 0, 0) (fixed by the trained critics); image tokens numbered 3 on axis 0 (a third
    reference image, as ComfyUI's ref_latents_method="index" numbers them) would share it: refused, not mixed up."""
    t = tiny_flux()
    kw = flux_inputs(t)
    handle = apply_inline_critic(t, _critic(t), mode="critique")
    with torch.no_grad():
        second = kw["img_ids"].clone()
        second[16:, 0] = 2
        t(**{**kw, "img_ids": second})  # references numbered 1 or 2: fine
        third = kw["img_ids"].clone()
        third[16:, 0] = 3
        with pytest.raises(EditSteerConfigError, match="RoPE index 3 on axis 0, the Inline Critic's own"):
            t(**{**kw, "img_ids": third})
        handle.set_mode("off")
        t(**{**kw, "img_ids": third})  # no critic rows: nothing to collide with
    remove_inline_critic(t)


def test_qwen_critic_does_not_depend_on_prompt_padding():
    """QwenImageEditPipeline pads every prompt of a batch to the longest one. The critic rows sit right after each
    sample's own prompt, so a padded sample's steered output and error map equal its unpadded run (they used to
    follow the padded length: 0.14 off)."""
    t = tiny_qwen()
    kw = qwen_inputs(t)  # sample 1: its last 2 text tokens are padding
    handle = apply_inline_critic(t, strong_steering_(_critic(t)), mode="steer")
    with torch.no_grad():
        full = t(**kw)[0]
        full_map = handle.last_call.error_map()
        one = {**kw, "hidden_states": kw["hidden_states"][1:], "timestep": kw["timestep"][1:],
               "encoder_hidden_states": kw["encoder_hidden_states"][1:, :-2],
               "encoder_hidden_states_mask": kw["encoder_hidden_states_mask"][1:, :-2],
               "img_shapes": kw["img_shapes"][:1]}
        single = t(**one)[0]
        torch.testing.assert_close(single[0], full[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(handle.last_call.error_map()[0], full_map[1], atol=1e-5, rtol=0)
        unmasked = t(**{**one, "encoder_hidden_states_mask": None})[0]  # no mask at all: the same positions
        torch.testing.assert_close(unmasked, single, atol=1e-5, rtol=0)
    remove_inline_critic(t)


def test_gradients_reach_only_the_critic_and_the_backbone_stays_bitwise_frozen(family):
    name, t, kw = family
    t.requires_grad_(False)
    before = snapshot(t)
    critic = _critic(t)
    handle = apply_inline_critic(t, critic, mode="steer")
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    init = snapshot(critic)
    for _ in range(2):
        out = t(**kw)[0]
        loss = out.pow(2).mean() + handle.last_call.error_map().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in t.parameters())
    assert all(not torch.equal(init[k], v) for k, v in critic.state_dict().items() if ".up" in k or k == "tokens")
    remove_inline_critic(t)
    after = snapshot(t)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_recomputes_with_the_critic():
    t = tiny_flux()
    kw = flux_inputs(t)
    critic = _critic(t)
    handle = apply_inline_critic(t, critic, mode="steer")
    t.requires_grad_(False)
    out_plain = t(**kw)[0]
    g_plain = torch.autograd.grad(out_plain.sum() + handle.last_call.error_map().sum(), critic.tokens)[0]
    t.enable_gradient_checkpointing()
    t.train()
    out_ckpt = t(**kw)[0]
    g_ckpt = torch.autograd.grad(out_ckpt.sum() + handle.last_call.error_map().sum(), critic.tokens)[0]
    torch.testing.assert_close(out_ckpt, out_plain)
    torch.testing.assert_close(g_ckpt, g_plain, atol=1e-5, rtol=1e-4)
    remove_inline_critic(t)


def test_bad_input_errors_and_failed_apply_leaves_the_transformer_unchanged():
    flux, qwen = tiny_flux(), tiny_qwen()
    with pytest.raises(ModelFamilyError, match="'qwen-image' family"):
        apply_inline_critic(flux, _critic(qwen))
    wide = InlineCritic(critic_config_for(flux, l_in=1).replace(width=64, num_heads=2))
    with pytest.raises(ModelFamilyError, match="width=64"):
        apply_inline_critic(flux, wide)
    with pytest.raises(EditSteerConfigError, match="past the model's depth"):
        critic_config_for(flux, l_in=4)
    with pytest.raises(EditSteerConfigError, match="unknown Inline Critic mode 'steering'"):
        apply_inline_critic(flux, _critic(flux), mode="steering")
    with pytest.raises(EditSteerConfigError, match="scale"):
        apply_inline_critic(flux, _critic(flux), scale=float("nan"))
    with pytest.raises(ModelFamilyError, match="supports FluxTransformer2DModel"):
        apply_inline_critic(torch.nn.Linear(2, 2), _critic(flux))

    # a non-stock processor on one block: refused before anything is touched
    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            raise AssertionError("not called")

    custom = Custom()
    flux.single_transformer_blocks[1].attn.set_processor(custom)
    procs, n_hooks = dict(flux.attn_processors), _hooks(flux)
    with pytest.raises(EditSteerConfigError, match="block 3 uses the attention processor Custom"):
        apply_inline_critic(flux, _critic(flux))
    assert all(flux.attn_processors[k] is v for k, v in procs.items()) and _hooks(flux) == n_hooks
    assert installed_critic(flux) is None

    apply_inline_critic(qwen, _critic(qwen))
    with pytest.raises(EditSteerError, match="already installed"):
        apply_inline_critic(qwen, _critic(qwen))
    remove_inline_critic(qwen)


def test_session_records_maps_and_restores_the_mode():
    t = tiny_qwen()
    kw = qwen_inputs(t)
    handle = apply_inline_critic(t, _critic(t), mode="off")
    with torch.no_grad(), handle.session(mode="critique") as records:
        t(**kw)
        t(**{**kw, "timestep": torch.full((2,), 0.25)})
    assert handle.mode == "off" and [r.timestep for r in records] == [0.5, 0.25]
    assert records[0].error_map.shape == (2, 4, 4) and records[0].mode == "critique"
    remove_inline_critic(t)

"""MLN's pieces alone: nudging math, TV weight, schedules and presets, token choice, mask quantile, user masks,
refinement, the sampler's processors."""

import numpy as np
import pytest
import torch

from diffusers_ext.errors import EditSteerConfigError
from diffusers_ext.mln import (
    SMOOTH_512,
    ClassifierFreeGuidance,
    MLNConfig,
    ScaleState,
    SourceNudge,
    interpolate_schedule,
    nudge_logits,
    refine_outside_mask,
    tv_weight,
)
from diffusers_ext.mln.masks import attention_difference, changed_token_pairs, prepare_user_mask, quantile_mask


def test_nudge_is_one_bounded_gradient_ascent_step():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 11, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    c = torch.rand(2, 5) * 12
    out = nudge_logits(z, y, c)
    # gradient of sum_i c_i log softmax(z_i)[y_i] w.r.t. z is c_i (onehot - softmax): the step taken
    logp = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    (grad,) = torch.autograd.grad((c * logp).sum(), z)
    torch.testing.assert_close(out - z, grad)
    assert ((out - z).abs() <= c[..., None] + 1e-6).all()  # |dz| <= c
    # the source token's probability never decreases
    p0 = z.softmax(-1).gather(-1, y[..., None])
    p1 = out.softmax(-1).gather(-1, y[..., None])
    assert (p1 >= p0 - 1e-7).all()
    assert torch.equal(nudge_logits(z.detach(), y, 0.0), z.detach())


def test_tv_weight_frees_disagreeing_tokens():
    z_s = torch.zeros(1, 3, 4)
    z_t = z_s.clone()
    z_t[0, 1] = torch.tensor([9.0, 0, 0, 0])  # token 1: the prompts disagree most
    z_t[0, 2] = torch.tensor([1.0, 0, 0, 0])  # token 2: a little
    w = tv_weight(z_t, z_s, gamma=1.5)
    assert w[0, 0] == 1.0 and w[0, 1] == 0.0 and 0 < w[0, 2] < 1
    tv = 0.5 * (z_t.softmax(-1) - z_s.softmax(-1)).abs().sum(-1)
    torch.testing.assert_close(w, (1 - tv / tv.max()).clamp(0, 1) ** 1.5)
    assert torch.equal(tv_weight(z_s, z_s), torch.ones(1, 3))  # full agreement: everything anchored


def test_presets_follow_official_v2():
    p512, p1024 = MLNConfig.preset("512"), MLNConfig.preset("1024")
    assert (p512.copy_scales, p512.cfg_stop, p512.mask_quantile, p512.refine_steps, p512.refine_tau) == (5, 9, 0.8, 5,
                                                                                                         0.2)
    assert p512.alphas == SMOOTH_512 and (p512.beta, p512.cfg, p512.gamma) == (12.0, 8.0, 1.5)
    assert (p1024.num_scales, p1024.copy_scales, p1024.cfg_stop, p1024.mask_quantile) == (14, 7, 13, 0.63)
    assert (p1024.refine_steps, p1024.refine_tau) == (3, 0.8)
    # 1024: SMOOTH sampled at linspace(0, 9, 14)
    x = np.linspace(0, 9, 14)
    expect = [SMOOTH_512[int(np.floor(v))] + (v - np.floor(v)) * (SMOOTH_512[min(9, int(np.floor(v)) + 1)]
                                                                  - SMOOTH_512[int(np.floor(v))]) for v in x]
    np.testing.assert_allclose(p1024.alphas, expect)
    assert p1024.alphas[0] == 12.0 and p1024.alphas[-1] == 0.5
    assert interpolate_schedule(SMOOTH_512, 10) == SMOOTH_512
    assert MLNConfig.for_num_scales(14).name == "1024"
    assert list(MLNConfig.preset("512").blocks_for_depth(30)) == list(range(3, 27))  # official blocks 3..26
    assert p512.anchor == p1024.anchor == "tokens" and p512.refine_keep == p1024.refine_keep == "mask"  # official


def test_a_modified_preset_says_so_in_its_name():
    """``info["preset"]`` and bench results carry the config's name: a changed field must show there, an override
    that changes nothing must not."""
    assert MLNConfig.preset("512", beta=8.0, cfg=3.0).name == "512+beta+cfg"
    assert MLNConfig.preset("512", beta=12.0).name == "512"
    assert MLNConfig.for_num_scales(6, anchor="tokens").fast().name == "toy+anchor-fast"
    assert MLNConfig.preset("512").replace(beta=1.0, name="mine").name == "mine"


def test_config_validation():
    with pytest.raises(EditSteerConfigError, match="one value per scale"):
        MLNConfig(num_scales=4, copy_scales=1, alphas=(1, 2))
    with pytest.raises(EditSteerConfigError, match="unknown MLN preset"):
        MLNConfig.preset("768")
    with pytest.raises(EditSteerConfigError, match="no MLN preset"):
        MLNConfig.for_num_scales(7)
    with pytest.raises(EditSteerConfigError, match="mask_quantile"):
        MLNConfig.preset("512", mask_quantile=1.5)
    with pytest.raises(EditSteerConfigError, match="anchor must be one of"):
        MLNConfig.preset("512", anchor="source")
    n = MLNConfig.preset("512").neutral()
    assert n.beta == 0 and set(n.alphas) == {0.0} and n.copy_scales == 0 and n.refine_steps == 0


def test_token_choice_is_the_changed_words_not_a_word_list():
    # ids: 0 start, 1 end; content tokens from 2 on
    src = [0, 10, 11, 12, 13, 1, 1, 1]  # "a red circle here" + padding
    tgt = [0, 10, 14, 12, 13, 1, 1, 1]  # "a blue circle here"
    assert changed_token_pairs(src, tgt, 6, 6, neighbours=0) == [(2, 2)]
    assert sorted(changed_token_pairs(src, tgt, 6, 6, neighbours=1)) == [(1, 1), (2, 2), (3, 3)]
    # insertion: the added tokens count against an all-zero map; later tokens stay aligned though shifted
    ins = [0, 10, 11, 20, 21, 12, 13, 1]
    pairs = changed_token_pairs(src, ins, 6, 8, neighbours=0)
    assert pairs == [(None, 3), (None, 4)]
    assert changed_token_pairs(src, src, 6, 6) == []  # identical prompts: nothing to compare


def test_attention_difference_and_quantile_mask():
    A_src = torch.zeros(16, 5)
    A_tgt = torch.zeros(16, 5)
    A_src[3, 2] = 1.0  # the changed word attends to image token 3 in the source run ...
    A_tgt[7, 2] = 0.5  # ... and to token 7 in the target run
    d = attention_difference(A_src, A_tgt, [(2, 2)])
    assert d.argmax() == 3 and d[7] == 0.5 and d.max() == 1.0 and d[0] == 0
    m = quantile_mask(d, 0.8)
    assert m[3] == 1 and m[7] == 1 and m.sum() == 2
    assert quantile_mask(torch.zeros(16), 0.8).sum() == 0
    assert attention_difference(A_src, A_tgt, []).sum() == 0


def test_user_mask_shapes():
    m = prepare_user_mask(np.ones((32, 32), np.float32), grid=8, sizes=[(32, 32)])
    assert m.shape == (1, 1, 8, 8) and m.min() == 1
    half = np.zeros((1, 1, 32, 32), np.float32)
    half[..., :16] = 1
    assert prepare_user_mask(torch.from_numpy(half), 8, [(32, 32)])[0, 0, 0].tolist() == [1] * 4 + [0] * 4
    assert prepare_user_mask(np.full((8, 8), 255, np.uint8), 8).max() == 1.0
    with pytest.raises(EditSteerConfigError, match="expected one 8x8 or 32x32 mask"):
        prepare_user_mask(np.ones((20, 32)), 8, [(32, 32)])
    with pytest.raises(EditSteerConfigError, match="for one image"):
        prepare_user_mask(np.ones((2, 32, 32)), 8, [(32, 32)])
    with pytest.raises(EditSteerConfigError, match=r"\[0, 1\]"):
        prepare_user_mask(np.full((32, 32), 3.0), 8, [(32, 32)])


def test_refinement_adds_source_detail_only_outside_the_mask():
    torch.manual_seed(0)
    E = 2 * torch.linalg.qr(torch.randn(16, 16))[0]  # 16 well-separated codes of norm 2
    f_hat = torch.randn(1, 16, 6, 6)  # the edited features
    j = torch.randint(0, 16, (6, 6))
    f = f_hat + E[j].permute(2, 0, 1)[None]  # the source differs by a codebook-expressible residual everywhere
    keep = torch.ones(1, 1, 6, 6)
    keep[..., :3] = 0  # left half: inside the edit mask
    out = refine_outside_mask(f, f_hat, E, keep, steps=5, tau=0.2)
    assert torch.equal(out[..., :3], f_hat[..., :3])  # inside: untouched
    torch.testing.assert_close(out[..., 3:], f[..., 3:], atol=1e-3, rtol=0)  # outside: the source's detail is back
    assert torch.equal(refine_outside_mask(f, f_hat, E, keep, steps=0), f_hat)


def test_processors_compose():
    K, B, l, V = 4, 1, 4, 6
    z_t, z_s = torch.randn(B, l, V), torch.randn(B, l, V)
    src = torch.randint(0, V, (B, l))
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    state = ScaleState(2, K, 2, negative_logits=z_s, source_tokens=src, mask=mask)
    nudge = SourceNudge(beta=12.0, alphas=(0, 0, 3.0, 0), gamma=1.5)
    out = nudge(2, z_t, state)
    s = state.extras["nudge_strength"]
    w = tv_weight(z_t, z_s, 1.5)
    torch.testing.assert_close(s, w * torch.tensor([[3.0, 3.0, 12.0, 12.0]]))
    torch.testing.assert_close(out, nudge_logits(z_t, src, s))
    cfg = ClassifierFreeGuidance(8.0, 0, 3)
    t = 8.0 * 2 / 3
    torch.testing.assert_close(cfg(2, out, state), (1 + t) * out - t * z_s)
    assert torch.equal(cfg(3, out, state), out) and not cfg.needs_negative(3)
    assert not SourceNudge(0.0, (0,) * K).needs_negative(2)


def test_anchored_weight_is_the_finest_tv_weighted_scale_on_the_final_grid():
    from diffusers_ext.mln.core import anchored_weight

    pns = (1, 2, 3, 4, 6, 8)
    w3, w6 = torch.rand(1, 9), torch.rand(1, 36)
    out = anchored_weight({2: w3, 4: w6}, pns)
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(w6.view(1, 1, 6, 6), size=(8, 8), mode="bilinear",
                                                                     align_corners=False))
    w8 = torch.rand(1, 64)
    assert torch.equal(anchored_weight({4: w6, 5: w8}, pns), w8.view(1, 1, 8, 8))
    assert anchored_weight({}, pns) == 1.0  # no TV weight anywhere: refine everywhere outside the mask
    with pytest.raises(EditSteerConfigError, match="refine_keep"):
        MLNConfig.preset("512", refine_keep="tv")
    assert MLNConfig.preset("512").refine_keep == MLNConfig.preset("1024").refine_keep == "mask"  # official

"""The toy world: determinism, exact masks, disjoint splits, metric sanity."""

import math

import numpy as np
import pytest

from diffusers_ext.toy import metrics as M
from diffusers_ext.toy import world as W


def test_cases_are_deterministic_and_seed_dependent():
    a = W.make_cases(12, "heldout", seed=3)
    b = W.make_cases(12, "heldout", seed=3)
    c = W.make_cases(12, "heldout", seed=4)
    for x, y in zip(a, b):
        assert x.instruction == y.instruction and np.array_equal(x.source, y.source)
        assert np.array_equal(x.target, y.target) and np.array_equal(x.mask, y.mask)
    assert [x.instruction for x in a] != [x.instruction for x in c]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_target_equals_source_outside_the_mask(split):
    for case in W.make_cases(60, split, seed=1):
        assert np.array_equal(case.source[~case.mask], case.target[~case.mask]), case.instruction
        assert case.mask.any()
        # the mask is tight: every masked pixel belongs to an old or new footprint (or the background for bg edits)
        changed = (case.source != case.target).any(-1)
        assert not (changed & ~case.mask).any()


def test_every_family_is_generated_and_masks_match_family():
    cases = W.make_cases(len(W.FAMILIES) * 4, "train", seed=0)
    assert {c.family for c in cases} == set(W.FAMILIES)
    for c in cases:
        if c.family == "background":
            assert c.mask.sum() > W.IMAGE_SIZE**2 // 2
        if c.family == "recolour":  # recolour keeps the footprint: every masked pixel changes
            assert (c.source != c.target).any(-1)[c.mask].all()


def test_splits_are_disjoint_in_combinations():
    held = W.make_cases(200, "heldout", seed=0)
    train = W.make_cases(200, "train", seed=0)
    assert all(W.combination_held_out(c.edit.key) for c in held)
    assert not any(W.combination_held_out(c.edit.key) for c in train)
    # every colour and shape still occurs in training for object families (so held-out tests composition)
    for fam in ("recolour", "remove", "add", "move", "resize"):
        train_keys = {(f, c, s) for f in [fam] for c in W.COLOURS for s in W.SHAPES} - set(W.held_out_combinations(fam))
        assert {k[1] for k in train_keys} == set(W.COLOURS)
        assert {k[2] for k in train_keys} == set(W.SHAPES)


def test_captions_describe_the_scenes():
    case = W.make_case("heldout", 0, 2)
    for o in case.edit.before.objects:
        assert f"{o.colour} {o.shape}" in case.source_caption
    for o in case.edit.after.objects:
        assert f"{o.colour} {o.shape}" in case.target_caption
    assert case.source_caption != case.target_caption


def test_sequences_chain_and_fix_the_untouched_region():
    seq = W.make_sequence("heldout", seed=0, index=1, turns=12)
    assert seq.turns == 12 and len(seq.images) == 13 and len(seq.masks) == 12
    for t in range(1, 13):
        prev, cur, m = seq.images[t - 1], seq.images[t], seq.masks[t - 1]
        assert np.array_equal(prev[~m], cur[~m])
        assert np.array_equal(seq.source[seq.untouched], cur[seq.untouched])
    assert seq.untouched.any()
    assert all(W.combination_held_out(e.key) for e in seq.edits)


def test_metric_sanity():
    case = W.make_case("heldout", 0, 0)
    perfect = M.case_metrics(case.target, case.target, case.mask)
    assert perfect["psnr"] == M.PSNR_MAX and perfect["background_psnr"] == M.PSNR_MAX
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["edit_success"] == 1.0
    ident = M.case_metrics(case.source, case.target, case.mask)
    assert ident["background_psnr"] == M.PSNR_MAX and ident["edit_success"] == 0.0
    # a known perturbation: +0.1 everywhere on [0,1] is MSE 0.01, PSNR 20 dB
    x = np.full((8, 8, 3), 0.5)
    assert M.mse(x, x + 0.1) == pytest.approx(0.01)
    assert M.psnr(x, x + 0.1) == pytest.approx(20.0)
    # masked means are true masked means
    y = x.copy()
    y[:4] += 0.2
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    assert M.mse(y, x, mask) == pytest.approx(0.04) and M.mse(y, x, ~mask) == 0.0
    assert math.isnan(M.mse(x, y, np.zeros((8, 8), bool)))


def test_ssim_drops_with_noise():
    case = W.make_case("train", 0, 0)
    rng = np.random.default_rng(0)
    noisy = np.clip(case.target / 255 + rng.normal(0, 0.1, case.target.shape), 0, 1)
    assert M.ssim(noisy, case.target) < 0.9


def test_sequence_metrics_of_a_perfect_run_are_perfect():
    seq = W.make_sequence("train", seed=0, index=0, turns=5)
    sm = M.sequence_metrics(seq.images[1:], seq)
    assert sm["drift_mse"] == [0.0] * 5 and sm["success"] == [1.0] * 5
    agg = M.aggregate_sequences([sm])
    assert agg["success_by_turn"] == [1.0] * 5 and agg["drift_slope"] == pytest.approx(0.0)

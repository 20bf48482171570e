"""VeriLatent core: config validation, maps, region, score, difficulty, budget policy, the search loop over a plain
Euler flow sampler. Pure torch, no pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_ext.errors import EditSteerConfigError
from diffusers_ext.verilatent import FlowEulerSampler, VeriLatentConfig, core, run_search
from diffusers_ext.verilatent.search import spatial_tokens

L, C = 64, 8  # an 8x8 token grid


def _candidates(n_good: int, n_bad: int, *, seed: int = 0, edit_rows=slice(0, 8), strength=2.0, noise=0.05):
    """Early predictions: 'good' candidates change the tokens of ``edit_rows``, 'bad' ones change nothing."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(L, C, generator=g)
    x0 = source.expand(n_good + n_bad, L, C) + noise * torch.randn(n_good + n_bad, L, C, generator=g)
    x0 = x0.clone()
    x0[:n_good, edit_rows] += strength
    return x0, source


# ---- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(n0=0), "N < 1"),
    (dict(n0=-2), "n0"),
    (dict(n0=4, n_max=2), "n_max"),
    (dict(k=0), "k"),
    (dict(n0=2, top_m=3), "top_m"),
    (dict(activation="clip"), "activation"),
    (dict(normalise="l2"), "normalise"),
    (dict(region="box"), "region"),
    (dict(lam=-1.0), "lam"),
    (dict(eps=0.0), "eps"),
    (dict(tau_easy=float("nan")), "tau_easy"),
    (dict(tau_agreement=float("inf")), "tau_agreement"),
    (dict(attention_weight=2.0), "attention_weight"),
    (dict(attention_layers=()), "attention_layers"),
    (dict(global_coverage=1.5), "global_coverage"),
    (dict(rollout_batch=0), "rollout_batch"),
    (dict(n0=True), "n0"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(EditSteerConfigError, match=match):
        VeriLatentConfig(**bad)


def test_config_defaults_budget_presets_and_round_trip():
    assert VeriLatentConfig().budget == 1 and not VeriLatentConfig().is_adaptive
    a = VeriLatentConfig.adaptive()
    assert (a.n0, a.max_candidates, a.is_adaptive) == (4, 12, True)
    assert a.easy_threshold() == a.easy_threshold("mix") != a.easy_threshold("latent")
    assert a.replace(tau_easy=0.3).easy_threshold("latent") == 0.3
    f = VeriLatentConfig.fixed(8, k=3)
    assert (f.n0, f.max_candidates, f.is_adaptive, f.k) == (8, 8, False, 3)
    assert VeriLatentConfig.from_dict(a.to_dict()) == a
    with pytest.raises(EditSteerConfigError, match="unknown fields"):
        VeriLatentConfig.from_dict({"n0": 2, "beam": 3})
    with pytest.raises(EditSteerConfigError, match="outside the schedule"):
        a.replace(k=8).check_steps(8)
    a.replace(k=7).check_steps(8)
    VeriLatentConfig(k=99).check_steps(8)  # budget 1 never stops early: any k is fine


def test_nfe_formula_matches_methods_md_example():
    cfg = VeriLatentConfig.fixed(8, k=3)
    assert cfg.nfe(28, 8) == 8 * 3 + 25 == 49
    assert cfg.nfe(28, 8, passes=2) == 98
    assert VeriLatentConfig().nfe(28, 1, passes=2) == 56
    assert VeriLatentConfig.adaptive(top_m=2, k=2).nfe(8, 12) == 12 * 2 + 2 * 6


# ---- maps, region, score ------------------------------------------------------------------------------------------

def test_predicted_clean_recovers_x0_of_an_euler_step():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, L, C, generator=g), torch.randn(3, L, C, generator=g)
    s0, s1 = 0.9, 0.8
    x_prev = (1 - s0) * x0 + s0 * noise
    v = noise - x0  # the exact flow velocity
    x_next = x_prev + (s1 - s0) * v
    assert torch.allclose(core.predicted_clean(x_prev, x_next, s0, s1), x0, atol=1e-5)
    with pytest.raises(EditSteerConfigError):
        core.predicted_clean(x_prev, x_next, 0.5, 0.5)


def test_score_prefers_the_edit_in_the_consensus_region_and_penalises_no_edit_and_leaks():
    x0, source = _candidates(3, 1)
    leak = source + 2.0  # a candidate that changes everything
    x0 = torch.cat([x0, leak.unsqueeze(0)])
    assert core.judge(x0, source, VeriLatentConfig.adaptive()).ranking()[-1] == 3  # defaults: no-edit loses
    # with a small magnitude weight the leak penalty decides between the leaking and the precise candidates
    j = core.judge(x0, source, VeriLatentConfig.adaptive(lam=1.0, mu=0.1))
    s = j.scores
    assert j.region.kind == "consensus"
    assert s[:3].min() > s[3] and s[:3].min() > s[4]  # no-edit and leaking candidates lose
    assert j.parts["leak"][4] > j.parts["leak"][0]
    assert j.parts["magnitude"][3] < j.parts["magnitude"][0]
    assert j.ranking()[0] in (0, 1, 2)


def test_user_mask_replaces_the_consensus():
    # the majority edits row 0, one candidate edits row 7: the mask says row 7 is right
    x0a, source = _candidates(3, 0, edit_rows=slice(0, 8))
    x0b = source.unsqueeze(0) + 0.0
    x0b = x0b.clone()
    x0b[0, 56:64] += 2.0
    x0 = torch.cat([x0a, x0b])
    cfg = VeriLatentConfig.adaptive()
    assert core.judge(x0, source, cfg).ranking()[-1] == 3
    mask = torch.zeros(32, 32)
    mask[28:, :] = 1  # bottom row of an 8x8 grid of 4x4-pixel tokens
    tok = core.mask_to_tokens(mask, (8, 8))
    j = core.judge(x0, source, cfg, mask=tok)
    assert j.region.kind == "mask" and j.ranking()[0] == 3


@pytest.mark.parametrize("shape", [(30, 32), (32,), (12, 12), (8, 16)])
def test_mask_of_the_wrong_size_is_refused(shape):
    with pytest.raises(EditSteerConfigError, match="mask"):
        core.mask_to_tokens(torch.ones(shape), (8, 8))


def test_mask_accepts_token_grid_and_pixel_multiples_and_rejects_empty():
    assert core.mask_to_tokens(torch.ones(8, 8), (8, 8)).shape == (64,)
    import numpy as np

    m = np.zeros((32, 32), np.uint8)
    m[:4, :4] = 255
    tok = core.mask_to_tokens(m, (8, 8))
    assert tok[0] == 1 and tok[1:].sum() == 0
    with pytest.raises(EditSteerConfigError, match="empty"):
        core.mask_to_tokens(torch.zeros(32, 32), (8, 8))


def test_global_edits_switch_to_magnitude_only():
    x0, source = _candidates(4, 0, edit_rows=slice(0, 64))  # every token changes
    j = core.judge(x0, source, VeriLatentConfig.adaptive())
    assert j.region.kind == "global" and float(j.parts["leak"].abs().max()) == 0.0


def test_normalise_modes_are_in_unit_range_and_zero_maps_stay_zero():
    a = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    for mode in ("max", "softmax"):
        n = core.normalise_map(a, mode, 0.2)
        assert float(n[0].max()) == pytest.approx(1.0) and float(n.min()) >= 0 and float(n[1].abs().sum()) == 0
    assert core.normalise_map(a, "softmax", 0.1)[0, 1] < core.normalise_map(a, "max")[0, 1]


def test_factor_grid():
    assert core.factor_grid(64) == (8, 8)
    assert core.factor_grid(128, aspect=2.0) == (8, 16)
    assert core.factor_grid(7) in ((1, 7), (7, 1))


# ---- difficulty and the adaptive budget ---------------------------------------------------------------------------

def test_adaptive_rounds_for_a_hard_edit_and_not_for_an_easy_one():
    cfg = VeriLatentConfig.adaptive(n_max=8, tau_easy=0.45, mu=0.1)
    easy_x0, src = _candidates(3, 1, strength=3.0)  # most candidates agree on a clear local edit
    hard_x0, src_h = _candidates(0, 4, noise=0.5)  # nobody edits: diffuse, weak maps
    easy, hard = core.judge(easy_x0, src, cfg), core.judge(hard_x0, src_h, cfg)
    assert easy.easy and not hard.easy
    assert easy.difficulty.best > hard.difficulty.best
    policy = core.BudgetPolicy(cfg)
    assert policy.first_round() == 4
    assert policy.next_round(4, easy) == 0
    assert policy.next_round(4, hard) == 4
    assert policy.next_round(8, hard) == 0  # n_max reached
    assert core.BudgetPolicy(VeriLatentConfig.fixed(4)).next_round(4, hard) == 0
    assert core.bucket(True, True) == "easy" and core.bucket(False, True) == "medium"
    assert core.bucket(False, False) == "hard"


class _ToyFlow:
    """A stand-in flow model on [n, L, C] tokens: its prediction depends on the initial noise, so that some seeds
    edit the first token row (x̂0 = source + edit) and others do not."""

    def __init__(self, good_seeds: set[int], strength: float):
        g = torch.Generator().manual_seed(0)
        self.source = torch.randn(L, C, generator=g)
        self.good, self.strength = good_seeds, strength
        self.flags: dict[int, float] = {}

    def noise(self, seed):
        x = torch.randn(1, L, C, generator=torch.Generator().manual_seed(seed))
        x[0, 0, 0] = 100.0 + (1.0 if seed in self.good else 0.0)  # the seed's signature, read back by denoise
        return x

    def denoise(self, x, sigma):
        target = self.source.expand_as(x).clone()
        is_good = ((x[:, 0, 0] - 100.0 * sigma) / sigma > 0.5).float() if sigma > 0 else torch.zeros(x.shape[0])
        target[:, :8] += self.strength * is_good[:, None, None]
        return target


def test_search_loop_spends_more_rounds_on_hard_edits_and_counts_nfe():
    T, k = 8, 2
    sigmas = torch.linspace(1, 0, T + 1)
    cfg = VeriLatentConfig.adaptive(k=k, n_max=8, tau_easy=0.45, mu=0.1)

    def run(good):
        m = _ToyFlow(good, 3.0)
        return run_search(FlowEulerSampler(m.denoise, sigmas, m.noise, m.source, grid=(8, 8)), cfg, seed=10)

    easy = run({10, 11, 12})  # 3 of the first 4 candidates edit
    hard = run(set())  # nobody ever edits
    assert easy.report.rounds == 1 and easy.report.bucket == "easy" and easy.report.chosen_seeds[0] in (10, 11, 12)
    assert hard.report.rounds == 2 and hard.report.candidates == 8 and hard.report.bucket == "hard"
    assert easy.report.nfe == 4 * k + (T - k) == easy.report.nfe_measured
    assert hard.report.nfe == 8 * k + (T - k)
    assert easy.report.maps()["normalised"].shape == (4, 8, 8)


def test_search_on_comfy_layout_latents_with_spatial_tokens():
    """[n, C, H, W] latents (ComfyUI LATENT layout) work through ``spatial_tokens``."""
    src = torch.zeros(4, 6, 6)

    def denoise(x, sigma):
        t = src.expand_as(x).clone()
        t[:, :, :2, :2] += (x[:, :1, :1, :1] > 0).float() * 2
        return t

    noise = lambda s: torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(s))  # noqa: E731
    sampler = FlowEulerSampler(denoise, torch.linspace(1, 0, 7), noise, spatial_tokens(src.unsqueeze(0))[0],
                               to_tokens=spatial_tokens, grid=(6, 6))
    res = run_search(sampler, VeriLatentConfig.fixed(4, k=1), seed=0)
    assert res.output.shape == (1, 4, 6, 6)
    assert math.isfinite(res.report.scores[0]) and len(res.report.scores) == 4


def test_pixel_verifier_shapes_and_pooling():
    imgs = torch.rand(3, 32, 32, 3)
    src = torch.rand(32, 32, 3)
    assert core.pixel_activation(imgs, src, 1).shape == (3, 1024)
    assert core.pixel_activation(imgs, src, 4).shape == (3, 64)
    with pytest.raises(EditSteerConfigError):
        core.pixel_activation(imgs, src, 5)


def test_ksampler_function_prunes_the_batch_like_the_search_loop():
    """The k-diffusion-style function (what ComfyUI's KSAMPLER wraps) keeps the candidate run_search chooses, and
    its survivor equals a straight run of that candidate's noise."""
    from diffusers_ext.verilatent.search import ksampler_function

    T, k = 8, 2
    sigmas = torch.linspace(1, 0, T + 1)
    m = _ToyFlow({1, 2}, 3.0)
    cfg = VeriLatentConfig.fixed(4, k=k)
    ref = run_search(FlowEulerSampler(m.denoise, sigmas, m.noise, m.source, grid=(8, 8)), cfg, seed=0)
    got = {}
    fn = ksampler_function(cfg, m.source, to_tokens=lambda t: t, grid=(8, 8),
                           on_report=lambda r: got.setdefault("r", r))
    x = torch.cat([m.noise(s) for s in range(4)])
    out = fn(lambda x, s: m.denoise(x, float(s[0])), x, sigmas)
    assert got["r"].finalists == ref.report.finalists and out.shape == (1, L, C)
    assert torch.allclose(out, ref.output, atol=1e-6)
    assert got["r"].nfe == ref.report.nfe == 4 * k + (T - k)
    with pytest.raises(EditSteerConfigError, match="batch"):
        fn(lambda x, s: m.denoise(x, float(s[0])), x[:3], sigmas)


def test_ksampler_function_counts_cfg_passes_and_refuses_an_adaptive_config():
    """Under CFG one model call per row runs two passes: the NFE says so (formula = rows actually run x passes). An
    adaptive config cannot run within one batch: it is refused instead of silently running as a fixed budget."""
    from diffusers_ext.verilatent.search import ksampler_function

    T, k = 8, 2
    sigmas = torch.linspace(1, 0, T + 1)
    m = _ToyFlow({1, 2}, 3.0)
    x = torch.cat([m.noise(s) for s in range(4)])
    got = {}
    fn = ksampler_function(VeriLatentConfig.fixed(4, k=k), m.source, to_tokens=lambda t: t, grid=(8, 8),
                           on_report=lambda r: got.__setitem__("r", r), passes_per_step=2)
    fn(lambda x, s: m.denoise(x, float(s[0])), x, sigmas)
    r = got["r"]
    assert r.passes_per_step == 2 and r.nfe == r.nfe_measured == (4 * k + (T - k)) * 2
    one = ksampler_function(VeriLatentConfig(), m.source, to_tokens=lambda t: t, passes_per_step=2,
                            on_report=lambda r: got.__setitem__("one", r))
    one(lambda x, s: m.denoise(x, float(s[0])), x[:1], sigmas)
    assert got["one"].nfe == got["one"].nfe_measured == T * 2
    with pytest.raises(EditSteerConfigError, match="adaptive"):
        ksampler_function(VeriLatentConfig.adaptive(k=k), m.source)
    with pytest.raises(EditSteerConfigError, match="passes_per_step"):
        ksampler_function(VeriLatentConfig.fixed(4), m.source, passes_per_step=0)


def test_medoid_ranking_puts_the_majority_first():
    x = torch.zeros(5, 4, 4)
    x[3] += 5.0  # an outlier
    x[1] += 0.1
    r = core.medoid_ranking(x)
    assert r[-1] == 3 and r[0] in (0, 2, 4)

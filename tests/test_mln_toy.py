"""The bundled toy Switti: it loads from the weight manifest, its tokeniser round-trips toy scenes, and MLN keeps the
background far better than regenerating from the target caption with the same seed (held-out toy edits, focus
captions: the edited object and the background, as a real edit prompt names its subject only)."""

import numpy as np
import pytest

from diffusers_ext.toy import metrics as M
from diffusers_ext.toy import world as W


@pytest.fixture(scope="module")
def toy():
    from diffusers_ext.mln import MLNPipeline
    from diffusers_ext.weights import resolve

    found = resolve("toy-switti")
    assert found.source == "bundled" and found.verified
    pipe = MLNPipeline.from_pretrained(found.path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_bundled_toy_is_a_switti_pipeline(toy):
    assert toy.resolution == W.IMAGE_SIZE and toy.patch_nums == (1, 2, 3, 4, 6, 8)
    assert type(toy.transformer).__name__ == "SwittiTransformer" and type(toy.vqvae).__name__ == "SwittiVQVAE"


def test_bundled_tokeniser_round_trips_toy_scenes(toy):
    """The toy VQ-VAE is not what bounds edit success: exact target scenes, tokenised over all scales and decoded,
    pass the bench's success criterion (90 % of the edit mask within 0.2 of the target)."""
    import torch

    cases = [W.make_case("heldout", seed=0, index=i) for i in range(24)]
    with torch.no_grad():
        x = W.to_tensor(np.stack([c.target for c in cases]))
        rec = toy.vqvae.fhat_to_img(toy.vqvae.img_to_fhat(x)[-1])
    ok = [M.case_metrics(W.from_tensor(rec[i]), c.target, c.mask, c.target)["edit_success"] for i, c in enumerate(cases)]
    assert np.mean(ok) >= 0.9, ok


def test_residual_anchor_rebuilds_the_source_over_an_edited_coarse_scale(toy):
    """Why the toy preset anchors to the re-tokenised residual. A background-colour edit changes the 1x1 token; over
    it, the source's fixed fine tokens (residuals over the source's own 1x1 token) decode the untouched objects
    badly, while the source re-tokenised over the new prefix (``residual_tokens``, what ``anchor="residual"`` nudges
    toward) rebuilds them. Over the source's own prefix both are the same tokens."""
    import torch

    from diffusers_ext.mln.pipeline import image_to_tensor
    from diffusers_ext.switti.backbone import SwittiBackbone

    enc = toy.encode_prompt(["a"], "cpu")
    bb = SwittiBackbone(toy.transformer, toy.vqvae, toy.prepare_conditioning([enc]), batch=1)
    K = len(toy.patch_nums)
    cases = [c for c in (W.make_case("train", seed=1, index=i) for i in range(80)) if c.family == "background"][:10]
    assert len(cases) == 10
    psnr = {"fixed": [], "residual": []}
    with torch.no_grad():
        for case in cases:
            src, f = bb.tokenize(image_to_tensor(W.to_pil(case.source)))
            tgt, _ = bb.tokenize(image_to_tensor(W.to_pil(case.target)))
            fixed = bb.prefix_fhat([tgt[0]] + src[1:], K)
            resid = bb.prefix_fhat(tgt[:1], 1)
            own = bb.prefix_fhat(src[:1], 1)
            for k in range(1, K):
                assert torch.equal(bb.residual_tokens(k, f, own), src[k])
                own = bb.accumulate(k, own, bb.embed_tokens(k, src[k]))
                resid = bb.accumulate(k, resid, bb.embed_tokens(k, bb.residual_tokens(k, f, resid)))
            objects = ~case.mask
            for name, fh in (("fixed", fixed), ("residual", resid)):
                img = W.from_tensor(bb.decode(fh)[0])
                mse = np.mean((img[objects].astype(np.float64) - case.target[objects]) ** 2) / 255**2
                psnr[name].append(10 * np.log10(1 / max(mse, 1e-10)))
    fixed, resid = np.mean(psnr["fixed"]), np.mean(psnr["residual"])
    assert resid > 25 and resid > fixed + 10, psnr


def test_mln_beats_regeneration_on_background_psnr(tmp_path):
    """``editsteer bench mln`` vs ``editsteer bench regen`` (same model, seed, sampling settings) on 36 held-out
    edits, six of each family: MLN keeps the background several dB better and still makes most edits."""
    import argparse

    from diffusers_ext.bench import harness
    from diffusers_ext.mln.bench import MLNMethod, RegenMethod

    res = {}
    for cls in (MLNMethod, RegenMethod):
        p = argparse.ArgumentParser()
        cls.add_arguments(p)
        res[cls.name] = harness.run(cls(p.parse_args([])), cases=36, seed=0, out=tmp_path / cls.name, progress=False)
    mln, regen = res["mln"]["metrics"], res["regen"]["metrics"]
    assert res["mln"]["settings"]["captions"] == "focus" and res["mln"]["settings"]["model"].endswith("toy-switti")
    assert mln["background_psnr"] > regen["background_psnr"] + 4.5, (mln, regen)  # measured: +5.8 dB
    assert mln["edit_success_rate"] > 0.5, mln  # measured: 63.9 %


def test_speed_benchmark_writes_its_json(tmp_path):
    """The speed benchmark (numbers in the README) runs and records wall and CPU time, per configuration."""
    import json

    from diffusers_ext.mln import speed

    assert speed.main(["--out", str(tmp_path), "--toy-cases", "1", "--repeats", "1"]) == 0
    r = json.loads((tmp_path / "speed.json").read_text())["toy"]
    assert r["plain_s"] > 0 and r["plain_cpu_s"] > 0 and r["cases"] == 1
    assert (r["device"], r["dtype"]) == ("cpu", "float32")  # where the models ran, read off the model
    for name in ("toy", "toy-fast"):
        m = r["mln"][name]
        assert m["mln_s"] > 0 and m["cpu_ratio"] > 0 and m["token_rows"] > 0
    # the fast variant does less transformer work than the paper's method
    assert r["mln"]["toy-fast"]["token_rows"] < r["mln"]["toy"]["token_rows"]
    # the every-scale-CFG baseline (official Switti default) guides the last scale too: more rows than the plain one
    pns = r["patch_nums"]
    assert r["token_rows_plain_cfg_all"] == r["token_rows_plain"] + pns[-1] ** 2 == 2 * sum(p * p for p in pns)
    v = r["mln"]["toy"]["vs_plain_cfg_all"]
    assert v["token_row_ratio"] == r["mln"]["toy"]["token_rows"] / r["token_rows_plain_cfg_all"] and v["cpu_ratio"] > 0
    # --dtype casts the models (the path a GPU run takes with --device cuda --dtype bf16)
    assert speed.main(["--out", str(tmp_path / "bf16"), "--toy-cases", "1", "--repeats", "1", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "speed.json").read_text())["toy"]["dtype"] == "bfloat16"



def test_full_size_variants_and_their_transformer_work():
    """What ``--full-size-variants`` times, and the work it predicts: the paper's method does more than 1.5x the
    token-rows of a plain generation at 512 and 1024 (two mask passes and a second row on the last scale), the fast
    variant less."""
    from diffusers_ext.mln import speed

    assert [c.name for c in speed.full_size_configs(512)] == ["512", "512-fast"]
    assert [c.name for c in speed.full_size_configs(1024)] == ["1024"]
    assert [c.name for c in speed.full_size_configs(1024, ["fast"])] == ["1024-fast"]
    for reso, pns in ((512, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
                      (1024, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))):
        paper, fast = speed.full_size_configs(reso, ["paper", "fast"])
        plain = speed.token_rows_plain(pns, paper.cfg_stop)
        # mask: 2 rows at the last scale; loop: 2 rows on every edited scale, the last one included (TV weight)
        assert speed.token_rows_mln(pns, paper) == 2 * pns[-1] ** 2 + 2 * sum(p * p for p in pns[paper.copy_scales:])
        assert speed.token_rows_mln(pns, paper) / plain > 1.5 > speed.token_rows_mln(pns, fast) / plain


def test_speed_baselines_are_named_by_where_guidance_stops(toy):
    """Any plain-generation baseline (as the Switti README's 1024 example) is timed and compared by name; 'plain'
    stays the reference of ``ratio``."""
    from diffusers_ext.mln import speed
    from diffusers_ext.mln.config import MLNConfig

    pipe = toy
    cfg = MLNConfig.preset("toy")
    case = W.make_case("heldout", 0, 0)
    cases = [(W.to_pil(case.source), case.source_caption, case.target_caption)]
    r = speed.bench_pipeline(pipe, cases, [cfg], 1, baselines={"plain": cfg.cfg_stop, "early_off": 3})
    pns = r["patch_nums"]
    assert r["token_rows_early_off"] == speed.token_rows_plain(pns, 3) < r["token_rows_plain"]
    assert r["early_off_cpu_s"] > 0 and "plain_cfg_all_s" not in r
    m = r["mln"]["toy"]
    assert m["vs_early_off"]["token_row_ratio"] == m["token_rows"] / r["token_rows_early_off"] > m["token_row_ratio"]
    with pytest.raises(ValueError, match="plain"):
        speed.bench_pipeline(pipe, cases, [cfg], 1, baselines={"early_off": 3})


def test_busy_time_is_the_time_inside_ops(toy):
    """``busy``: the profiled time inside torch ops, a part of the wall time (the rest is Python and launches),
    reported for every baseline and configuration with its ratio to plain generation's."""
    import time

    import torch

    from diffusers_ext.bench.timing import busy_s
    from diffusers_ext.mln import speed
    from diffusers_ext.mln.config import MLNConfig

    x = torch.randn(256, 256)
    t = time.perf_counter()
    b = busy_s(lambda: [x @ x for _ in range(20)])
    assert 0 < b < time.perf_counter() - t
    assert busy_s(lambda: time.sleep(0.05)) < 0.01  # Python-side time is not busy time

    cfg = MLNConfig.preset("toy")
    case = W.make_case("heldout", 0, 0)
    r = speed.bench_pipeline(toy, [(W.to_pil(case.source), case.source_caption, case.target_caption)], [cfg], 1,
                             busy=True)
    assert 0 < r["plain_busy_s"] and 0 < r["plain_cfg_all_busy_s"]
    m = r["mln"]["toy"]
    assert m["busy_ratio"] == m["busy_s"] / r["plain_busy_s"] and m["busy_s"] > 0
    assert "busy_s" not in speed.bench_pipeline(toy, [(W.to_pil(case.source), case.source_caption,
                                                       case.target_caption)], [cfg], 1)["mln"]["toy"]

def test_bench_set_overrides_config_fields_and_refuses_unknown_ones(tmp_path):
    import argparse

    from diffusers_ext.bench import harness
    from diffusers_ext.errors import EditSteerConfigError
    from diffusers_ext.mln.bench import MLNMethod

    def method(*argv):
        p = argparse.ArgumentParser()
        MLNMethod.add_arguments(p)
        return MLNMethod(p.parse_args(list(argv)))

    m = method("--gt-mask", "--set", "copy_scales=0", "--set", "alphas=[0, 0, 0, 0, 0, 0]", "--set", "beta=4")
    assert (m.config.copy_scales, m.config.alphas, m.config.beta) == (0, (0.0,) * 6, 4.0)
    assert m.variant == "gt-mask+set:copy_scales=0,alphas=[0, 0, 0, 0, 0, 0],beta=4"
    res = harness.run(m, cases=2, seed=1, split="train", out=tmp_path / "b", progress=False)
    assert res["settings"]["config"]["copy_scales"] == 0 and res["settings"]["variant"].startswith("gt-mask+set:")
    # nothing copied, nothing nudged in the mask: the output differs from the preset's on the same case
    ref = harness.run(method("--gt-mask"), cases=2, seed=1, split="train", out=tmp_path / "r", progress=False)
    assert [c["edit_region_mse"] for c in res["per_case"]] != [c["edit_region_mse"] for c in ref["per_case"]]
    for bad, match in (("copy_scale=0", "KEY=VALUE"), ("beta", "KEY=VALUE"), ("beta=strong", "JSON"),
                       ("alphas=[1, 2]", "one value per scale")):
        with pytest.raises(EditSteerConfigError, match=match):
            method("--set", bad)

"""`editsteer compare`: paired, case-by-case differences of two bench runs with bootstrap intervals."""

import json

import numpy as np
import pytest

from diffusers_ext.bench.compare import paired_comparison
from diffusers_ext.cli import main
from diffusers_ext.errors import EditSteerConfigError


def _bench(tmp_path, method, cases, seed, *extra):
    out = tmp_path / f"{method}-{cases}-{seed}"
    assert main(["bench", method, "--cases", str(cases), "--seed", str(seed), "--out", str(out), "--quiet",
                 *extra]) == 0
    return out


def _results(ids, **cols):
    rows = [{"id": i, **{k: v[n] for k, v in cols.items()}} for n, i in enumerate(ids)]
    return {"method": "m", "kind": "single", "split": "heldout", "seed": 0, "per_case": rows}


def test_compare_two_real_runs_matches_their_per_case_rows(tmp_path, capsys):
    base = _bench(tmp_path, "base", 12, 0)
    ident = _bench(tmp_path, "identity", 12, 0)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(base), str(ident / "results.json"), "--boot", "500", "--out", str(out)]) == 0
    assert "| edit_region_mse | 12 |" in capsys.readouterr().out
    res = json.loads(out.read_text())
    rb = json.loads((base / "results.json").read_text())["per_case"]
    ri = json.loads((ident / "results.json").read_text())["per_case"]
    e = res["metrics"]["edit_region_mse"]
    mb = np.mean([r["edit_region_mse"] for r in rb])
    mi = np.mean([r["edit_region_mse"] for r in ri])
    assert e["base"] == pytest.approx(mb) and e["method"] == pytest.approx(mi)
    assert e["delta"] == pytest.approx(mi - mb) and e["rel"] == pytest.approx(mi / mb - 1)
    assert e["delta_ci"][0] <= e["delta"] <= e["delta_ci"][1]
    assert res["cases"] == 12 and res["method"] == "identity" and res["base_method"] == "base"
    assert res["command"].startswith("editsteer compare ")
    # returning the source keeps the background perfect (PSNR capped at 100): the base editor cannot beat it
    assert res["metrics"]["background_psnr"]["delta"] > 0


def test_a_run_against_itself_differs_by_nothing(tmp_path):
    base = json.loads((_bench(tmp_path, "identity", 6, 1) / "results.json").read_text())
    res = paired_comparison(base, base, n_boot=200)
    for e in res["metrics"].values():
        assert e["delta"] == 0 and e["delta_ci"] == [0, 0]


def test_intervals_are_paired_across_cases():
    rng = np.random.default_rng(0)
    b = rng.uniform(10, 40, 200)  # cases differ a lot from each other ...
    base = _results(range(200), background_psnr=b)
    method = _results(range(200), background_psnr=b - 0.3)  # ... the method moves every case by the same -0.3
    e = paired_comparison(base, method, n_boot=1000)["metrics"]["background_psnr"]
    assert e["delta"] == pytest.approx(-0.3)
    assert e["delta_ci"] == pytest.approx([-0.3, -0.3])  # unpaired resampling would give about +-1.2


def test_resampling_is_seeded_and_level_sets_the_width():
    rng = np.random.default_rng(1)
    base = _results(range(60), edit_region_mse=rng.uniform(0, 1, 60))
    method = _results(range(60), edit_region_mse=rng.uniform(0, 1, 60))
    a = paired_comparison(base, method, n_boot=400, seed=3)["metrics"]["edit_region_mse"]
    b = paired_comparison(base, method, n_boot=400, seed=3)["metrics"]["edit_region_mse"]
    c = paired_comparison(base, method, n_boot=400, seed=3, level=0.5)["metrics"]["edit_region_mse"]
    assert a == b
    assert c["delta_ci"][1] - c["delta_ci"][0] < a["delta_ci"][1] - a["delta_ci"][0]
    assert a["rel_ci"][0] <= a["rel"] <= a["rel_ci"][1]


def test_missing_values_drop_the_pair_only():
    base = _results("abcd", background_psnr=[20.0, None, 30.0, 25.0], ssim=[0.5, 0.5, 0.5, 0.5])
    method = _results("abcd", background_psnr=[21.0, 22.0, None, 26.0], ssim=[0.6, 0.6, 0.6, 0.6])
    m = paired_comparison(base, method, n_boot=100)["metrics"]
    assert m["background_psnr"]["n"] == 2 and m["background_psnr"]["delta"] == pytest.approx(1.0)
    assert m["ssim"]["n"] == 4 and "leakage" not in m


def test_different_cases_and_multiturn_runs_are_refused(tmp_path, capsys):
    a = _bench(tmp_path, "identity", 4, 0)
    b = _bench(tmp_path, "identity", 4, 1)
    assert main(["compare", str(a), str(b)]) == 2
    assert "not on the same cases" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "no bench results" in capsys.readouterr().err
    mt = _bench(tmp_path, "identity-mt", 1, 0, "--turns", "2")
    with pytest.raises(EditSteerConfigError, match="single-turn"):
        paired_comparison(json.loads((mt / "results.json").read_text()), json.loads((a / "results.json").read_text()))


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0 and "bootstrap" in capsys.readouterr().out


def test_by_family_splits_the_difference_by_edit_family(capsys, tmp_path):
    fam = ["add", "move"] * 50
    b = np.linspace(10, 30, 100)
    base = _results(range(100), background_psnr=b, family=fam)
    method = _results(range(100), background_psnr=b + np.where(np.array(fam) == "add", 2.0, -1.0), family=fam)
    res = paired_comparison(base, method, n_boot=300, by_family=True)
    assert res["metrics"]["background_psnr"]["delta"] == pytest.approx(0.5)
    assert {k: v["cases"] for k, v in res["families"].items()} == {"add": 50, "move": 50}
    assert res["families"]["add"]["metrics"]["background_psnr"]["delta_ci"] == pytest.approx([2.0, 2.0])
    assert res["families"]["move"]["metrics"]["background_psnr"]["delta"] == pytest.approx(-1.0)
    assert "families" not in paired_comparison(base, method, n_boot=10)
    with pytest.raises(EditSteerConfigError, match="family"):
        paired_comparison(_results(range(3), background_psnr=[1, 2, 3]), _results(range(3), background_psnr=[1, 2, 3]),
                          n_boot=10, by_family=True)
    # the command prints one row per family
    a, m = tmp_path / "a.json", tmp_path / "m.json"
    a.write_text(json.dumps(base))
    m.write_text(json.dumps(method))
    assert main(["compare", str(a), str(m), "--by-family", "--boot", "50", "--metrics", "background_psnr"]) == 0
    text = capsys.readouterr().out
    assert "| add | 50 | +2 [+2, +2] |" in text and "| move | 50 | -1 [-1, -1] |" in text

"""``editsteer bench verilatent`` / ``bench bon`` and the quality-vs-NFE report, on a stand-in toy editor (the tiny
random Kontext saved with toy settings): the plumbing, the NFE bookkeeping and the report files."""

from __future__ import annotations

import json

import pytest

from diffusers_ext.cli import main as cli_main


@pytest.fixture(scope="module")
def standin(tiny_kontext_dir, tmp_path_factory):
    import shutil

    from diffusers_ext.toy.editor import write_settings

    d = tmp_path_factory.mktemp("vl") / "standin"
    shutil.copytree(tiny_kontext_dir, d)
    write_settings(d, num_inference_steps=4)
    return d


def test_bench_bon_and_verilatent_write_comparable_runs_and_a_report(standin, tmp_path):
    runs = tmp_path / "runs"
    common = ["--model", str(standin), "--cases", "2", "--quiet"]
    assert cli_main(["bench", "bon", "--n", "1", "--out", str(runs / "single"), *common]) == 0
    assert cli_main(["bench", "bon", "--n", "3", "--out", str(runs / "bon3"), *common]) == 0
    assert cli_main(["bench", "verilatent", "--mode", "adaptive", "--k", "1", "--n-max", "8", "--tau-easy", "1e9",
                     "--out", str(runs / "ad"), *common]) == 0
    single = json.loads((runs / "single" / "results.json").read_text())
    bon = json.loads((runs / "bon3" / "results.json").read_text())
    ad = json.loads((runs / "ad" / "results.json").read_text())
    assert single["nfe_mean"] == 4 and bon["nfe_mean"] == 12
    assert ad["nfe_mean"] == 8 * 1 + (4 - 1)  # never easy: 2 rounds of 4, k = 1, T = 4
    c = ad["per_case"][0]
    assert c["nfe_measured"] == c["nfe"] and c["decodes"] == 1 and c["bucket"] == "hard"
    assert c["chosen_seed"] in range(single["per_case"][0]["chosen_seed"], single["per_case"][0]["chosen_seed"] + 8)
    assert (runs / "ad" / "cases" / c["id"] / "region.png").is_file()
    assert {"non_model_frac", "verify_frac"} <= set(ad["settings"]["overhead"])
    ov = ad["settings"]["overhead"]  # the mixed map's attention hooks run inside the transformer: verifier time
    assert 0 < ov["capture_s"] <= ov["verify_s"] and 0 < c["capture_s"] <= c["verify_s"]
    assert bon["settings"]["overhead"]["capture_s"] == 0

    from diffusers_ext.verilatent import report

    assert report.main([str(runs)]) == 0
    summary = json.loads((runs / "quality_vs_nfe.json").read_text())
    assert [r["method"] for r in summary["table"]] == ["single", "VeriLatent adaptive 4->8 k=1", "BoN-3"]
    assert summary["comparable"] and summary["buckets"]["VeriLatent adaptive 4->8 k=1"]["hard"]["cases"] == 2
    t = summary["targets"]["VeriLatent adaptive 4->8 k=1"]
    assert t["nfe_by_bucket"] == {"hard": 11.0} and not t["nfe_differs_by_bucket"] and "bon8_success" not in t
    assert (runs / "quality_vs_nfe.png").stat().st_size > 0


def test_bench_rejects_bad_budgets_with_a_clear_message(standin, tmp_path, capsys):
    assert cli_main(["bench", "bon", "--n", "0", "--model", str(standin), "--cases", "1", "--out", str(tmp_path)]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert cli_main(["bench", "verilatent", "--n0", "8", "--n-max", "4", "--model", str(standin), "--cases", "1",
                     "--out", str(tmp_path)]) == 2
    assert "n_max must be an integer >= n0" in capsys.readouterr().err

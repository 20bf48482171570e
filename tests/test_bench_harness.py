"""`editsteer bench` writes the documented report for single- and multi-turn methods."""

import json

from PIL import Image

from diffusers_ext.cli import main


def _decoded_size(path):
    with Image.open(path) as im:
        im.load()  # the whole file decodes
        return im.size


def test_identity_bench_report(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "identity", "--cases", "6", "--seed", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("method", "cases", "seed", "metrics", "nfe_mean", "wall_s", "peak_mem_mb", "per_case"):
        assert key in res
    for key in ("edit_region_mse", "edit_success_rate", "background_psnr", "psnr", "ssim"):
        assert key in res["metrics"]
    assert res["metrics"]["edit_success_rate"] == 0.0 and res["metrics"]["background_psnr"] == 100.0
    assert len(res["per_case"]) == 6 and res["seed"] == 2
    cid = res["per_case"][0]["id"]
    for name in ("source", "target", "mask", "output"):
        assert _decoded_size(out / "cases" / cid / f"{name}.png") == (32, 32)
    case = json.loads((out / "cases" / cid / "case.json").read_text())
    assert case["instruction"]
    assert _decoded_size(out / "grid.png")[1] > 6 * 32


def test_multiturn_bench_report(tmp_path):
    out = tmp_path / "mt"
    assert main(["bench", "identity-mt", "--cases", "2", "--turns", "4", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["metrics"]["drift_by_turn"]) == 4 and len(res["metrics"]["success_by_turn"]) == 4
    assert res["metrics"]["drift_by_turn"] == [0.0] * 4  # returning the source never drifts


def test_unknown_method_and_family_are_clear_errors(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", "nonsense"])
    assert e.value.code == 2
    assert main(["bench", "identity", "--families", "teleport", "--out", str(tmp_path)]) == 2
    assert "unknown families" in capsys.readouterr().err


def test_report_records_the_command_that_reproduces_it(tmp_path):
    out = tmp_path / "c"
    assert main(["bench", "identity", "--cases", "2", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == f"editsteer bench identity --cases 2 --seed 3 --out {out} --quiet"

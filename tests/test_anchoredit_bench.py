"""`editsteer bench anchoredit|refeed` on short sequences; base Wan checkpoints resolve from a Hub-layout cache."""

import json

import pytest

from fixtures_anchoredit import small_pipeline

from diffusers_ext.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae-bench") / "model"
    small_pipeline(window=2).save_pretrained(d)
    return d


@pytest.mark.parametrize("flags", [[], ["--no-sink"], ["--full-cache"]], ids=["sink+window", "no-sink", "full"])
def test_anchoredit_bench_reports_drift_time_and_memory_by_turn(model_dir, tmp_path, flags):
    out = tmp_path / "b"
    assert main(["bench", "anchoredit", "--model", str(model_dir), "--cases", "2", "--turns", "6", "--out", str(out),
                 "--quiet", *flags]) == 0
    res = json.loads((out / "results.json").read_text())
    m, s = res["metrics"], res["settings"]
    assert len(m["drift_by_turn"]) == 6 and len(m["success_by_turn"]) == 6
    assert len(s["time_s_by_turn"]) == 6 and len(s["cache_mb_by_turn"]) == 6
    frames = s["cache_frames_by_turn"]
    if "--full-cache" in flags:
        assert frames == [2, 3, 4, 5, 6, 7] and s["anchoredit"]["window"] is None
    else:  # the window (2) bounds the kept turns; the sink keeps the source
        assert frames == ([2, 3, 3, 3, 3, 3] if not flags else [2] * 6)
        # flat once the window and the undo copies (undo_depth 2) are full
        assert s["cache_mb_by_turn"][-1] == s["cache_mb_by_turn"][-2] > s["cache_mb_by_turn"][0]
    assert res["nfe_mean"] == 6 * 5 + 1  # 4 steps + 1 write per turn, + the source
    assert (out / "turns.png").is_file()


def test_refeed_bench_runs_the_toy_editor_turn_by_turn(tiny_kontext_dir, tmp_path):
    out = tmp_path / "r"
    assert main(["bench", "refeed", "--model", str(tiny_kontext_dir), "--cases", "2", "--turns", "2",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["metrics"]["drift_by_turn"]) == 2 and res["nfe_mean"] == 4


def test_base_wan_checkpoint_resolves_from_the_hf_cache(hf_cache, tmp_path):
    from diffusers_ext.anchoredit import AnchorEditPipeline
    from diffusers_ext.tiny import write_hf_cache_repo
    from diffusers_ext.weights import resolve

    folder = tmp_path / "wan"
    small_pipeline().save_pretrained(folder)  # a tiny pipeline in the exact layout of the Wan Diffusers repos
    write_hf_cache_repo(hf_cache, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", folder)
    found = resolve("wan2.1-t2v-1.3b-diffusers")
    assert found.source == "hf cache" and not found.verified
    pipe = AnchorEditPipeline.from_pretrained(found.path)
    assert pipe.transformer.config.num_layers == 1

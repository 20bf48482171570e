"""The critic's cost benchmark (``python -m diffusers_ext.critic.cost``) on the bundled toy editor."""

import json

import pytest


def test_cost_benchmark_times_every_mode_and_profiles_busy_time(tmp_path):
    from diffusers_ext.critic import cost

    out = tmp_path / "cost"
    assert cost.main(["--only", "toy", "--repeats", "1", "--threads", "1", "--n-tokens", "4", "--adapter-rank", "8",
                      "--steer-rank", "8", "--busy", "--out", str(out)]) == 0
    configs = json.loads((out / "cost.json").read_text())["configs"]
    assert [c["name"] for c in configs] == ["toy editor 32x32 batch 1", "toy editor 32x32 batch 16"]
    modes = ("bare", "off", "critique", "steer")
    for r in configs:
        assert set(r["time_s_median"]) == set(modes) and all(r["time_s_median"][m] > 0 for m in modes)
        assert set(r["overhead_pct_vs_bare"]) == {"off", "critique", "steer"}
        # busy time: one profiled forward per mode (on the CPU, ops are most of a forward, and profiling slows
        # them a little) and its overhead over bare
        busy, wall = r["busy_s"], r["time_s_median"]
        assert set(busy) == set(modes) and all(0.3 * wall[m] < busy[m] < 3 * wall[m] for m in modes)
        pct = 100 * (busy["steer"] / busy["bare"] - 1)  # from the rounded seconds
        assert r["busy_overhead_pct_vs_bare"]["steer"] == pytest.approx(pct, abs=0.5)
    # without --busy nothing is profiled
    assert cost.main(["--only", "toy", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "plain")]) == 0
    assert "busy_s" not in json.loads((tmp_path / "plain" / "cost.json").read_text())["configs"][0]

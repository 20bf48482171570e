"""``editsteer train anchoredit``: every stage runs a few steps, exports a pipeline, and resumes exactly."""

import argparse
import json

import pytest
import torch

from fixtures_anchoredit import small_pipeline

from diffusers_ext.anchoredit import AnchorEditPipeline
from diffusers_ext.anchoredit.objectives import (
    FrameTimestepConfig,
    degrade_history,
    sample_frame_timesteps,
    turn_weights,
)
from diffusers_ext.anchoredit.train import add_arguments
from diffusers_ext.anchoredit.trainer import step_random, train
from diffusers_ext.cli import main

COMMON = ["--threads", "1", "--log-every", "1", "--pool-cases", "8", "--pool-sequences", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae") / "init"
    small_pipeline().save_pretrained(d)
    return d


def _weights(folder):
    return AnchorEditPipeline.from_pretrained(folder).transformer.state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frame_timesteps_degradation_and_turn_weights():
    g = torch.Generator().manual_seed(0)
    t = sample_frame_timesteps(512, 6, g, FrameTimestepConfig())
    assert t.min() >= 20 and t.max() <= 979 and t.shape == (512, 6)
    assert t[:, 0].min() >= 20 + 0.35 * 960 - 1  # every frame, the source included, is noised
    assert t[:, -1].mean() > t[:, 0].mean() + 50  # monotonic upper bound: later turns noisier on average
    flat = sample_frame_timesteps(512, 6, torch.Generator().manual_seed(0), FrameTimestepConfig(monotonic=False))
    assert abs(flat[:, -1].mean() - flat[:, 0].mean()) < 30
    w = turn_weights(1, 5, 1.0, torch.tensor([[False, False, True, False, False]]))
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 5 / 3, 2.0]]))  # 1 + q_i; replaced: 0; last turn 2x
    lat = torch.randn(64, 6, 4, 8, 8)
    d = degrade_history(lat, torch.Generator().manual_seed(1))
    err = (d - lat).square().mean(dim=(0, 2, 3, 4))
    assert err[0] <= err[-1] and err[-1] > 0  # stronger at later frames


def test_stage_vae_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "vae"
    assert main(["train", "anchoredit", "--stage", "vae", "--out", str(out), "--steps", "2", "--lr", "1e-3",
                 "--threads", "1", "--batch-size", "2"]) == 0
    rec = json.loads((out / "editsteer_train.json").read_text())
    assert rec["finished"] and rec["phases"]["vae"]["steps"] == 2 and "vae_reconstruction_psnr" in rec
    pipe = AnchorEditPipeline.from_pretrained(out)
    assert len(pipe.vae.config.latents_std) == pipe.vae.config.z_dim


def test_stage1_runs_with_null_instruction_pairs(init_dir, tmp_path):
    out = tmp_path / "s1"
    assert main(["train", "anchoredit", "--stage", "1", "--init", str(init_dir), "--out", str(out), "--steps", "2",
                 "--lr", "1e-3", "--null-prob", "0.5", *COMMON]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert not _equal(_weights(out), _weights(init_dir))
    assert AnchorEditPipeline.from_pretrained(out).sampler_config.kind == "flow"


def test_stage2_resume_equals_uninterrupted(init_dir, tmp_path):
    args = ["train", "anchoredit", "--stage", "2", "--init", str(init_dir), "--lr", "1e-3", "--max-turns", "3",
            "--self-forcing-warmup", "1", "--save-every", "2", *COMMON]
    assert main([*args, "--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"]) == 0
    assert _equal(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))
    rec = json.loads((tmp_path / "resumed" / "editsteer_train.json").read_text())
    assert rec["phases"]["stage2"]["steps"] == 4 and rec["finished"]


def test_stage3_cd_then_dmd_runs_and_resumes(init_dir, tmp_path):
    args = ["train", "anchoredit", "--stage", "3", "--init", str(init_dir), "--lr", "1e-4", "--cd-steps", "2",
            "--dmd-turns", "2", "--gen-update-ratio", "2", "--teacher-guidance", "1", "--real-guidance", "0",
            "--ema-decay", "0.5", "--save-every", "1", *COMMON]
    assert main([*args, "--out", str(tmp_path / "straight"), "--dmd-steps", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--dmd-steps", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--dmd-steps", "3", "--resume"]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert _equal(a, b) and not _equal(a, _weights(init_dir))
    pipe = AnchorEditPipeline.from_pretrained(tmp_path / "straight")
    assert pipe.sampler_config.kind == "distilled" and pipe.sampler_config.timesteps == (1000, 750, 500, 250)
    rec = json.loads((tmp_path / "resumed" / "editsteer_train.json").read_text())
    assert rec["phases"]["cd"]["done"] and rec["phases"]["dmd"]["steps"] == 3


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["2", "3"])
def test_processes_draw_their_own_batches_but_share_the_graph_decisions(init_dir, tmp_path, stage):
    """Under ``accelerate launch`` every process runs the same loop. Each must draw its own samples, noise and
    timesteps (else N GPUs train N times on one batch), while the draws that shape the step's graph (turns; the
    target turn k; DMD's depth s) must agree, or FSDP's collectives fall out of step. Two processes simulated here."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["--stage", stage, "--init", str(init_dir), "--lr", "1e-3", *COMMON]
    argv += (["--steps", "4", "--max-turns", "4", "--self-forcing-warmup", "1"] if stage == "2" else
             ["--cd-steps", "3", "--dmd-steps", "4", "--dmd-turns", "4", "--gen-update-ratio", "2",
              "--teacher-guidance", "1", "--real-guidance", "0", "--pool-sequences", "16"])
    logs = {}
    for rank in (0, 1):
        out = tmp_path / f"rank{rank}"
        assert train(p.parse_args([*argv, "--out", str(out)]), process=(rank, 2)) == 0
        logs[rank] = _log(out)
    shared = ("turns",) if stage == "2" else ("k", "gen")
    assert len(logs[0]) == len(logs[1]) > 0
    for a, b in zip(logs[0], logs[1]):
        assert a["phase"] == b["phase"] and all(a[k] == b[k] for k in shared if k in a)  # one graph per step
        if a["loss"] or b["loss"]:  # (DMD's first generator step: 0 everywhere, the fake score starts as the real)
            assert a["loss"] != b["loss"]  # other samples / noise / timesteps
        if stage == "2":
            assert (a["t_first"], a["t_last"]) != (b["t_first"], b["t_last"])
    assert len({r["turns"] for r in logs[0]}) > 1 if stage == "2" else True  # the shared draw does vary by step


def test_one_process_draws_one_stream_as_before():
    """A single process (and so every committed toy run) keeps one generator per step: its draws are unchanged."""
    one = step_random(0, "stage2", 7)
    assert one.shared is one.local
    two = [step_random(0, "stage2", 7, rank, 2) for rank in (0, 1)]
    assert all(torch.equal(torch.rand(3, generator=r.shared), torch.rand(3, generator=one.shared.manual_seed(
        one.shared.initial_seed()))) for r in two)
    a, b = (torch.rand(8, generator=r.local) for r in two)
    assert not torch.equal(a, b)

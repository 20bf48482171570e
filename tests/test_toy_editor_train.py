"""The toy-editor training command (2-3 steps on a tiny config, resume) and the main-job / bench commands."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from diffusers_ext.toy import train_editor
from diffusers_ext.toy import world as W

TINY = ["--dim", "32", "--head-dim", "32", "--double-blocks", "1", "--single-blocks", "1", "--text-dim", "16", "--vae-channels", "8,8",
        "--batch-size", "2", "--vae-batch-size", "2", "--log-every", "1", "--checkpoint-every", "1",
        "--eval-every", "0", "--eval-cases", "2", "--threads", "1", "--vae-steps", "2"]


def _train(out, *extra):
    p = argparse.ArgumentParser()
    train_editor.add_arguments(p)
    return train_editor.run(p.parse_args(["--out", str(out), *TINY, *extra]))


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_resume_and_load(tmp_path):
    from diffusers import FluxKontextPipeline

    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    assert [r["step"] for r in _log(out) if r["stage"] == "vae"] == [1, 2]
    assert [r["step"] for r in _log(out) if r["stage"] == "editor"] == [1, 2]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["vae_step"], state["step"]) == ("editor", 2, 2)
    with pytest.raises(Exception, match="--resume"):  # never silently overwrite a checkpoint
        _train(out, "--steps", "3")
    assert _train(out, "--steps", "3", "--resume") == 0
    rows = _log(out)
    assert [r["step"] for r in rows if r["stage"] == "editor"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["stage"] == "vae"] == [1, 2]  # the VAE stage is not redone
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if r["stage"] == "eval"] == [2, 3]

    folder = out / "pipeline"
    pipe = FluxKontextPipeline.from_pretrained(folder)
    assert pipe.vae.config.shift_factor == pytest.approx(state["vae_shift_factor"])
    assert json.loads((folder / "editsteer_toy.json").read_text())["max_sequence_length"] == 16
    # the exported transformer holds the EMA weights saved in the checkpoint
    from diffusers_ext.weights import load_safetensors

    ema = load_safetensors(out / "checkpoint" / "ema.safetensors")
    w = pipe.transformer.state_dict()["proj_out.weight"]
    torch.testing.assert_close(w, ema["transformer.proj_out.weight"])


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, "--steps", "3", "--ema", "0", "--eval-cases", "0")
    _train(b, "--steps", "1", "--ema", "0", "--eval-cases", "0")
    _train(b, "--steps", "3", "--ema", "0", "--eval-cases", "0", "--resume")
    la = [r["loss"] for r in _log(a) if r["stage"] == "editor"]
    lb = [r["loss"] for r in _log(b) if r["stage"] == "editor"]
    assert la == pytest.approx(lb, rel=1e-5)


def test_training_targets_match_the_pipeline_sampler():
    """A transformer that returns the training target v = (x_t - x0) / sigma for the case's true x0 (what a perfect
    model of our loss predicts) makes the unmodified pipeline return exactly the decoded x0: training and sampling
    share latents, packing, ids, condition layout, timestep scale and flow direction."""
    from diffusers_ext.toy.editor import toy_pipeline_kwargs

    p = argparse.ArgumentParser()
    train_editor.add_arguments(p)
    pipe = train_editor.build_pipeline(p.parse_args(TINY))
    pipe.set_progress_bar_config(disable=True)
    c = W.make_case("heldout", 0, 3)
    src, tgt = W.to_tensor(c.source)[None], W.to_tensor(c.target)[None]
    noise, x0, cond, ids = train_editor.encode_pair(pipe, src, tgt, torch.Generator().manual_seed(0))
    assert noise.shape == x0.shape == cond.shape == (1, 64, pipe.transformer.config.in_channels)
    assert ids.shape == (128, 3) and (ids[:64, 0] == 0).all() and (ids[64:, 0] == 1).all()
    torch.testing.assert_close(ids[:64, 1:], ids[64:, 1:])
    seen = []

    def oracle(hidden_states, timestep, img_ids, **kw):
        torch.testing.assert_close(hidden_states[:, 64:], cond, atol=1e-3, rtol=0)  # condition after noisy tokens
        torch.testing.assert_close(img_ids, ids)
        seen.append(float(timestep))
        v = (hidden_states[:, :64] - x0) / timestep.view(-1, 1, 1)
        return (torch.cat([v, torch.zeros_like(cond)], 1),)

    pipe.transformer.forward = oracle
    img = pipe(image=W.to_pil(c.source), prompt=c.instruction, generator=torch.Generator().manual_seed(0),
               output_type="pt", **toy_pipeline_kwargs(pipe))[0]
    lat = pipe._unpack_latents(x0, 32, 32, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    expected = pipe.image_processor.postprocess(pipe.vae.decode(lat).sample, output_type="pt")
    torch.testing.assert_close(img, expected, atol=1e-4, rtol=0)
    assert len(seen) == 8 and seen[0] == pytest.approx(1.0) and all(a > b for a, b in zip(seen, seen[1:]))
    # training draws sigmas from the same shifted distribution (64 tokens -> the pipeline's mu)
    mu = train_editor.sequence_mu(pipe, 64)
    sig = train_editor.sample_sigmas(4096, mu, torch.Generator().manual_seed(0))
    assert 0 < float(sig.min()) and float(sig.max()) < 1 and float(sig.median()) > 0.5


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "diffusers_ext", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_main_job_writes_its_pictures(tmp_path):
    r = _cli(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "editsteer_out"
    for f in ("side_by_side.png", "output.png", "source.png", "edit.json"):
        assert (out / f).is_file(), f
    info = json.loads((out / "edit.json").read_text())
    assert info["columns"] == ["source", "output", "exact target"] and "metrics" in info
    # a user's own image, larger than the toy size, is resized
    big = np.kron(W.make_case("heldout", 1, 0).source, np.ones((3, 3, 1), np.uint8))
    W.to_pil(big).save(tmp_path / "in.png")
    r = _cli("edit", "--image", "in.png", "--instruction", "change the background to white", "--out", "o2",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(tmp_path / "o2" / "output.png") as im:
        im.load()  # the whole file decodes
        assert im.size == (W.IMAGE_SIZE, W.IMAGE_SIZE)
    r = _cli("weights", "verify", "toy-kontext-editor", cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_bench_base_runs(tmp_path):
    from diffusers_ext.bench import harness
    from diffusers_ext.bench.registry import load_method

    cls = load_method("base")
    p = argparse.ArgumentParser()
    cls.add_arguments(p)
    method = cls(p.parse_args(["--steps", "4"]))
    res = harness.run(method, cases=2, seed=0, out=tmp_path, progress=False)
    assert res["nfe_mean"] == 4 and res["settings"]["num_inference_steps"] == 4
    assert {"edit_success_rate", "edit_region_mse", "background_psnr"} <= set(res["metrics"])
    assert (tmp_path / "grid.png").is_file()

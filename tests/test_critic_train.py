"""The Inline Critic's commands on a tiny editor: probe diagnostic, three-stage training (resumable), bench."""

import argparse
import json

import pytest
import torch
from fixtures_critic import critic_editor_dir, critic_folder  # noqa: F401  (fixtures)

from diffusers_ext.critic import InlineCritic


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def test_probe_command_on_a_tiny_editor(critic_editor_dir, tmp_path):
    from diffusers_ext.critic import probe

    out = tmp_path / "probe"
    assert probe.run(_args(probe, ["--model", critic_editor_dir, "--cases", 4, "--batch-size", 4,
                                   "--out", out])) == 0
    res = json.loads((out / "probe.json").read_text())
    assert res["depth"] == 4 and len(res["rho_mean"]) == 4 and len(res["rho_by_sigma"]) == 2
    assert res["rho_mean"][-1] == pytest.approx(1.0)  # the last block's read-out is the model output itself
    assert all(-1 <= r <= 1 for r in res["rho_mean"]) and 0 <= res["suggested_l_in"] < 4
    assert (out / "probe.png").stat().st_size > 0


TRAIN = ["--steps1", 3, "--steps2", 3, "--steps3", 3, "--cases", 8, "--val-cases", 4, "--batch-size", 2,
         "--save-every", 2, "--log-every", 100, "--adapter-rank", 2, "--l-in", 1, "--threads", 1]


def test_three_stage_training_resumes_exactly_and_exports(critic_editor_dir, tmp_path, monkeypatch):
    from diffusers_ext.critic import train

    common = ["--model", critic_editor_dir, *TRAIN]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.run(_args(train, [*common, "--out", full])) == 0
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log if "loss" in r} == {1, 2, 3}
    assert all("l_fm" in r and "l_crit" in r for r in log if r.get("stage") == 3 and "loss" in r)
    summary = json.loads((full / "summary.json").read_text())
    assert len(summary["probe_curve"]["trained_probes"]) == 4
    assert summary["stage2_val"]["fm"] == summary["stage2_val"]["fm_off"]  # stage 2 never changes the output
    critic = InlineCritic.from_pretrained(full / "critic")
    assert critic.config.stage == 3 and critic.config.mode == "steer" and critic.config.l_in == 1

    # interrupted twice (mid stage 2, mid stage 3), resumed: the same critic, bit for bit
    assert train.run(_args(train, [*common, "--out", cut, "--stop-after", 5])) == 0
    assert json.loads((cut / "checkpoints" / "latest" / "state.json").read_text())["stage"] == 2
    assert train.run(_args(train, [*common, "--out", cut, "--resume", "--stop-after", 2])) == 0
    monkeypatch.setenv("EDITSTEER_MANIFEST_DIR", str(tmp_path / "manifest"))
    assert train.run(_args(train, [*common, "--out", cut, "--resume", "--export", tmp_path / "x" / "my-critic",
                                   "--register", "my-critic"])) == 0
    a = InlineCritic.from_pretrained(full / "critic").state_dict()
    b = InlineCritic.from_pretrained(cut / "critic").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --export/--register wrote a bundled-style folder and a manifest entry the resolver verifies
    from diffusers_ext.weights import load_manifest

    art = load_manifest()["my-critic"]
    assert {f.path for f in art.files} == {"critic.safetensors", "config.json", "README.md", "training.json"}
    assert art.extra["training"]["stages"] == [1, 2, 3] and art.status == "unpublished"
    assert art.produced_by.startswith("editsteer train critic") and art.bundled_path == "my-critic"
    monkeypatch.setenv("EDITSTEER_WEIGHTS_DIR", str(tmp_path / "x"))
    assert InlineCritic.from_pretrained("my-critic").config == critic.config


def test_bench_critic_method_runs_in_the_harness(critic_editor_dir, critic_folder, tmp_path):
    from diffusers_ext.bench import harness
    from diffusers_ext.critic.bench import CriticMethod

    args = _args(CriticMethod, ["--model", critic_editor_dir, "--weights", critic_folder])
    res = harness.run(CriticMethod(args), cases=2, seed=0, out=tmp_path / "bench", progress=False)
    assert res["method"] == "critic" and res["settings"]["mode"] == "steer" and res["nfe_mean"] == 2
    case = res["per_case"][0]
    assert (tmp_path / "bench" / "cases" / case["id"] / "error_map.png").is_file()
    assert "critic_error_in_mask" in case


def test_max_minutes_time_box_ends_every_stage_early_with_a_usable_critic(critic_editor_dir, tmp_path):
    from diffusers_ext.critic import train

    out = tmp_path / "boxed"
    argv = ["--model", critic_editor_dir, *TRAIN, "--steps1", 500, "--steps2", 500, "--steps3", 500,
            "--max-minutes", 1e-6, "--out", out]
    assert train.run(_args(train, argv)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == {"1": 1, "2": 1, "3": 1}  # each stage: one step, then its share is spent
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("time box" in r.get("event", "") for r in log) == 3
    critic = InlineCritic.from_pretrained(out / "critic")
    assert critic.config.stage == 3 and critic.config.mode == "steer"


def test_decoupled_steering_learns_its_gates_and_headroom_measures_on_the_same_draws(critic_editor_dir, tmp_path):
    from diffusers_ext.critic import train
    from diffusers_ext.critic.headroom import main as headroom

    out = tmp_path / "dec"
    argv = ["--model", critic_editor_dir, *TRAIN, "--stages", "3", "--steer-attention", "decoupled", "--out", out]
    assert train.run(_args(train, argv)) == 0
    critic = InlineCritic.from_pretrained(out / "critic")
    assert critic.config.steer_attention == "decoupled" and sorted(critic.gates) == ["2", "3"]
    assert all(torch.count_nonzero(g) > 0 for g in critic.gates.values())  # the zero-initialised gates moved
    val = json.loads((out / "summary.json").read_text())["stage3_val"]
    assert val["fm"] != val["fm_off"]

    # the headroom reference measures on the same validation draws: its step-0 numbers are the critic's fm_off
    hr = tmp_path / "headroom"
    assert headroom(["--model", str(critic_editor_dir), "--steps", "2", "--cases", "8", "--val-cases", "4",
                     "--batch-size", "2", "--val-every", "1", "--lr", "1e-3", "--threads", "1", "--out", str(hr),
                     "--save-pipeline", str(tmp_path / "ft")]) == 0
    res = json.loads((hr / "headroom.json").read_text())
    assert [c["step"] for c in res["curve"]] == [0, 1, 2]
    assert res["curve"][0]["fm"] == pytest.approx(val["fm_off"], abs=2e-6)
    assert res["curve"][0]["fm_edit"] == pytest.approx(val["fm_edit_off"], abs=2e-6)
    assert res["curve"][-1]["fm"] != res["curve"][0]["fm"]
    from diffusers import FluxTransformer2DModel

    a = FluxTransformer2DModel.from_pretrained(critic_editor_dir, subfolder="transformer").state_dict()
    b = FluxTransformer2DModel.from_pretrained(tmp_path / "ft", subfolder="transformer").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the saved copy is fine-tuned, the source is untouched


def test_headroom_runs_are_reproducible_across_processes(critic_editor_dir, tmp_path):
    """Batches are drawn from integer-seeded generators: two processes (different hash salts) give the same curve."""
    import os
    import subprocess
    import sys

    curves = []
    for salt in ("1", "2"):
        out = tmp_path / f"h{salt}"
        env = {**os.environ, "PYTHONHASHSEED": salt, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "diffusers_ext.critic.headroom", "--model", str(critic_editor_dir),
                        "--steps", "2", "--cases", "8", "--val-cases", "4", "--batch-size", "2", "--val-every", "2",
                        "--lr", "1e-3", "--threads", "1", "--out", str(out)], check=True, env=env,
                       capture_output=True)
        curves.append(json.loads((out / "headroom.json").read_text())["curve"])
    assert [(c["fm"], c["fm_edit"]) for c in curves[0]] == [(c["fm"], c["fm_edit"]) for c in curves[1]]


def test_headroom_lora_trains_only_adapters_and_saves_the_merged_editor(critic_editor_dir, tmp_path):
    """``--lora-rank``: the backbone never changes while training; every block linear gets an adapter; the saved
    editor is the LoRA folded into the weights (same output as the wrapped model)."""
    from diffusers import FluxTransformer2DModel

    from diffusers_ext.critic.headroom import LoRALinear, add_lora, main as headroom, merge_lora

    tr = FluxTransformer2DModel.from_pretrained(critic_editor_dir, subfolder="transformer")
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    blocks = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)
    wrapped = add_lora(tr, blocks, rank=2)
    n_linear = sum(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules()
                   if not isinstance(m, LoRALinear)) - len(wrapped)  # the wrapped bases are still modules
    assert n_linear == 0 and {"to_q", "proj_out", "linear"} <= {n for _, n, _ in wrapped}
    assert not any(p.requires_grad for n, p in tr.named_parameters() if not n.endswith((".down", ".up")))
    for _, _, w in wrapped:  # a trained LoRA: random up
        torch.nn.init.normal_(w.up, std=0.02)
    x = torch.randn(1, 16, tr.config.in_channels)
    kw = dict(encoder_hidden_states=torch.randn(1, 8, tr.config.joint_attention_dim),
              pooled_projections=torch.randn(1, tr.config.pooled_projection_dim), timestep=torch.tensor([0.5]),
              img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                                 indexing="ij"), -1).reshape(-1, 3),
              txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]) if tr.config.guidance_embeds else None,
              return_dict=False)
    with torch.no_grad():
        lora_out = tr(x, **kw)[0]
        merge_lora(wrapped)
        merged_out = tr(x, **kw)[0]
    assert not any(isinstance(m, LoRALinear) for m in tr.modules())
    assert torch.allclose(lora_out, merged_out, atol=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in tr.state_dict().items())

    out = tmp_path / "lora"
    assert headroom(["--model", str(critic_editor_dir), "--lora-rank", "2", "--steps", "2", "--cases", "8",
                     "--val-cases", "4", "--batch-size", "2", "--val-every", "2", "--lr", "1e-2", "--threads", "1",
                     "--out", str(out), "--save-pipeline", str(tmp_path / "lora-editor")]) == 0
    res = json.loads((out / "headroom.json").read_text())
    n = sum(w.down.numel() + w.up.numel() for _, _, w in wrapped)
    assert res["trained"] == "lora" and res["trainable_params"] == n
    assert res["curve"][-1]["fm"] != res["curve"][0]["fm"]
    saved = FluxTransformer2DModel.from_pretrained(tmp_path / "lora-editor", subfolder="transformer").state_dict()
    assert set(saved) == set(before)  # a plain editor: no adapter tensors
    changed = {k for k in saved if not torch.equal(saved[k], before[k])}
    assert changed and all(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in changed)
    assert all(k.endswith(".weight") for k in changed)  # LoRA moves weights, never biases


def test_each_stage_trains_exactly_the_parameters_that_get_a_gradient(critic_editor_dir):
    """Stage 2 (error-map loss, critique mode) never reaches the steering adapters, the decoupled gates or the critic
    adapters after the last critique block: they must not be trainable there (DistributedDataParallel would wait for
    their gradient forever), while stage 3 trains every parameter."""
    from diffusers_ext.critic import apply_inline_critic, critic_config_for, remove_inline_critic, train
    from diffusers_ext.critic.data import KontextEditData
    from diffusers_ext.toy.editor import load_toy_editor

    pipe, _ = load_toy_editor(critic_editor_dir)
    t = pipe.transformer.requires_grad_(False)
    data = KontextEditData.from_toy_world(pipe, 4, split="train", seed=0)
    torch.manual_seed(0)
    critic = InlineCritic(critic_config_for(t, l_in=1, l_c=(2,), adapter_rank=2, steer_rank=2,
                                            steer_attention="decoupled"))
    handle = apply_inline_critic(t, critic, mode="off")
    try:
        for stage, mode in ((2, "critique"), (3, "steer")):
            handle.set_mode(mode)
            train._set_stage_trainable(critic, stage)
            module = train._stage_module(stage, t, critic, data, handle, 1.0)
            batch = data.batch(torch.arange(2))
            x_t, v_star, sigma = data.noised(batch, torch.Generator().manual_seed(0))
            critic.zero_grad(set_to_none=True)
            module(batch, x_t, v_star, sigma)["loss"].backward()
            trained = {n for n, p in critic.named_parameters() if p.requires_grad}
            assert trained == {n for n, p in critic.named_parameters() if p.grad is not None}, stage
            frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in critic.named_parameters()
                      if not p.requires_grad}
            assert frozen == ({"gates.2", "gates.3", "steer_adapters.2", "steer_adapters.3", "adapters.3"}
                              if stage == 2 else set())
    finally:
        remove_inline_critic(t)


def test_two_process_training_with_steering_adapters_and_gates(critic_editor_dir, tmp_path):
    """``accelerate launch`` with two processes (gloo on CPU, as torchrun starts them): stages 2 and 3 with steering
    adapters and decoupled gates run to the end (stage 2 used to fail on its second step in DistributedDataParallel:
    parameters without a gradient)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "diffusers_ext", "train", "critic", "--model", str(critic_editor_dir),
           "--stages", "2,3", "--steps2", "3", "--steps3", "2", "--cases", "8", "--val-cases", "4",
           "--batch-size", "2", "--log-every", "100", "--l-in", "1", "--adapter-rank", "2", "--steer-rank", "2",
           "--steer-attention", "decoupled", "--threads", "1", "--out", str(out)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["processes"] for r in log if "loss" in r} == {2}
    assert {r["stage"] for r in log if "loss" in r} == {2, 3}
    critic = InlineCritic.from_pretrained(out / "critic")
    assert critic.config.stage == 3 and all(torch.count_nonzero(g) > 0 for g in critic.gates.values())

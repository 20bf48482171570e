"""``editsteer train critic``: the Inline Critic's three-stage recipe on a frozen Kontext editor (``methods.md`` §1.4).

Stage 1, *probe*: per-block velocity probes ``P_l`` (AdaLN + MLP, initialised as the logit lens) trained with
``MSE(P_l(h_l), v*)``; their Spearman curve picks ``l_in`` (first block with rho >= ``--rho-threshold``).
Stage 2, *masked critic*: the critic reads every token and nothing attends to it (the model output is unchanged);
tokens, critique head(s) and adapters learn ``MSE(e_hat, e~)``, ``e~`` = the log-normalised per-token error of the
model's output. Stage 3, *unmasked joint*: tokens of the blocks from ``steer_start`` attend to the critic;
``L = L_FM + lambda * L_crit`` with ``L_FM = MSE(v_theta(x_t), v*)``; initialised from stage 2.

The backbone is frozen throughout (``requires_grad_(False)``; only critic/probe tensors are in the optimizer, and
each stage only those it trains: stage 2 leaves the steering adapters and gates, which it never uses, frozen).
Runs under ``accelerate launch`` unchanged (one batch per process, gradients all-reduced); checkpoints are
safetensors + JSON (no pickle): ``--resume`` continues from the last one, mid-stage included.

Example::

    editsteer train critic --out runs/critic --steps1 200 --steps2 300 --steps3 600
    editsteer train critic --out runs/critic --resume                   # after an interruption
    editsteer train critic --out runs/critic --max-minutes 30           # time box (per-stage shares)
    accelerate launch -m diffusers_ext train critic --out runs/critic   # several processes / GPUs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HELP = "train an Inline Critic for a frozen toy editor (stages: probe, masked critic, unmasked joint)"


def _layers(s: str) -> list[int] | str:
    if s == "auto":
        return "auto"
    return [int(x) for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="frozen editor: manifest id or pipeline folder (default: toy)")
    p.add_argument("--out", default="runs/critic", help="run folder (log.jsonl, checkpoints/, critic/)")
    p.add_argument("--stages", default="1,2,3", help="stages to run, e.g. 1,2,3 or 3 (the stage-3-only ablation)")
    p.add_argument("--steps1", type=int, default=200, help="stage-1 (probe) steps")
    p.add_argument("--steps2", type=int, default=300, help="stage-2 (masked critic) steps")
    p.add_argument("--steps3", type=int, default=600, help="stage-3 (unmasked joint) steps")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="critic learning rate (AdamW)")
    p.add_argument("--lr-probe", type=float, default=1e-3, help="probe learning rate (stage 1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps per stage")
    p.add_argument("--lambda-crit", dest="lambda_crit", type=float, default=1.0,
                   help="weight of the critique loss in stage 3")
    p.add_argument("--edit-weight", type=float, default=0.0,
                   help="stage-3 flow-matching loss weight 1 + w on target tokens inside the edit mask (the toy "
                        "editor's own training weights them so; 0: plain flow matching)")
    p.add_argument("--n-tokens", type=int, default=1, help="critic tokens n_c")
    p.add_argument("--l-in", type=_layers, default="auto", help="insertion block, or 'auto' (probe curve)")
    p.add_argument("--l-c", type=_layers, default="auto",
                   help="critique block(s), comma-separated, or 'auto' (l_in + a third of the remaining depth)")
    p.add_argument("--steer-start", type=int, default=None, help="first steering block (default l_in + 1)")
    p.add_argument("--adapter-rank", type=int, default=0, help="rank of per-block critic q/k/v adapters (0: none)")
    p.add_argument("--steer-rank", type=int, default=0,
                   help="rank of the steering adapters on the image rows' q/k/v/output of every steering block")
    p.add_argument("--steer-unconditioned", action="store_true",
                   help="steering adapters not scaled by the critic's state (the ablation)")
    p.add_argument("--steer-attention", choices=("joint", "decoupled"), default="joint",
                   help="how steering blocks attend to the critic: one joint softmax, or a separate gated attention "
                        "added to the frozen one (zero-initialised gates)")
    p.add_argument("--head-hidden", type=int, default=64, help="critique head hidden width")
    p.add_argument("--rho-threshold", type=float, default=0.8)
    p.add_argument("--cases", type=int, default=2048, help="training edit pairs (toy world, train split)")
    p.add_argument("--val-cases", type=int, default=64, help="validation pairs (train split, other seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in this invocation (a checkpoint is written; continue with "
                        "--resume): time-sliced training on a shared machine")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="time box of this invocation: each stage gets a share of M minutes proportional to its "
                        "step count and ends early (checkpoint, validation and log record included) when its share "
                        "is spent; the log records the steps actually done")
    p.add_argument("--export", default=None, help="also write the final critic's Hub-ready folder here (critic.safetensors, "
                                                  "config.json, README.md, training.json), e.g. "
                                                  "diffusers_ext/assets/toy-critic")
    p.add_argument("--register", default=None, metavar="ID",
                   help="with --export: write weights_manifest/ID.json for the exported folder")
    p.add_argument("--description", default=None, help="manifest description (with --register)")


# -- checkpoints (safetensors + JSON, never pickle) ------------------------------------------------------------------
def _optimizer_tensors(opt) -> tuple[dict, dict]:
    import torch

    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, stage: int, step: int, module, opt, run_state: dict) -> Path:
    from ..weights import save_safetensors

    ck = out / "checkpoints"
    tmp = ck / "latest.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if stage == 1:
        module.save(tmp / "probes.safetensors")
    else:
        module.save_weights(tmp / "critic.safetensors")
    tensors, meta = _optimizer_tensors(opt)
    save_safetensors(tensors, tmp / "optimizer.safetensors", metadata={"optimizer": json.dumps(meta)})
    (tmp / "state.json").write_text(json.dumps({**run_state, "stage": stage, "step": step}, indent=2) + "\n")
    final = ck / "latest"
    old = ck / "latest.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint_state(out: Path) -> dict | None:
    p = out / "checkpoints" / "latest" / "state.json"
    return json.loads(p.read_text()) if p.is_file() else None


class StopTraining(Exception):
    """Raised after ``--stop-after`` steps, once the checkpoint is written."""


# -- the per-stage training module -------------------------------------------------------------------------------
def _stage_module(stage: int, transformer, trainable, data, handle, lambda_crit: float, edit_weight: float = 0.0):
    import torch
    import torch.nn.functional as F

    from . import core
    from .taps import capture_blocks

    class StageModule(torch.nn.Module):
        """Frozen transformer + the stage's trainable module; ``forward`` returns the stage's losses."""

        def __init__(self):
            super().__init__()
            self.transformer = transformer
            self.trainable = trainable

        def forward(self, batch, x_t, v_star, sigma):
            n = x_t.shape[1]
            if stage == 1:
                with torch.no_grad(), capture_blocks(self.transformer, n) as tap:
                    data.forward(self.transformer, batch, x_t, sigma)
                per = {l: F.mse_loss(self.trainable(l, h, tap.temb), v_star.float()) for l, h in tap.hidden.items()}
                loss = torch.stack(list(per.values())).mean()
                return {"loss": loss, **{f"probe_mse_{l}": v.detach() for l, v in per.items()}}
            v_hat = data.forward(self.transformer, batch, x_t, sigma)
            target = core.log_normalise(core.token_errors(v_hat.detach(), v_star))
            e_hat = handle.last_call.error_map()
            l_crit = F.mse_loss(e_hat, target)
            rho = core.spearman(e_hat.detach(), target).nanmean()
            if stage == 2:
                return {"loss": l_crit, "l_crit": l_crit.detach(), "rho": rho}
            l_fm = core.flow_matching_loss(v_hat, v_star, batch.get("edit_tokens"), edit_weight)
            return {"loss": l_fm + lambda_crit * l_crit, "l_fm": l_fm.detach(), "l_crit": l_crit.detach(),
                    "rho": rho}

    return StageModule()


def _lr_at(base: float, step: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


def _train_stage(acc, stage: int, steps: int, start_step: int, transformer, trainable, data, handle, args,
                 out: Path, run_state: dict, lr: float, log, budget: dict) -> None:
    import torch

    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    if start_step > 0:
        from ..weights import load_safetensors, read_safetensors_metadata

        f = out / "checkpoints" / "latest" / "optimizer.safetensors"
        _load_optimizer(opt, load_safetensors(f), json.loads(read_safetensors_metadata(f)["optimizer"]))
    module = _stage_module(stage, transformer, trainable, data, handle, args.lambda_crit, args.edit_weight)
    module, opt = acc.prepare(module, opt)
    rank, world = acc.process_index, acc.num_processes
    t0 = time.perf_counter()
    step = start_step
    deadline = None if budget.get("seconds", {}).get(stage) is None else t0 + budget["seconds"][stage]
    for step in range(start_step, steps):
        if deadline is not None and step > start_step and time.perf_counter() > deadline:
            log({"stage": stage, "event": f"time box: stage {stage} ends at step {step}/{steps}", "step": step,
                 "steps": steps})
            budget.setdefault("steps_done", {})[stage] = step
            if acc.is_main_process:
                save_checkpoint(out, stage, step, acc.unwrap_model(module).trainable, opt, run_state)
            return
        g = torch.Generator().manual_seed(hash((args.seed, stage, step, rank)) % (2**63))
        idx = torch.randint(len(data), (args.batch_size,), generator=g)
        batch = {k: v.to(acc.device) for k, v in data.batch(idx).items()}
        x_t, v_star, sigma = data.noised(batch, g)
        for group in opt.param_groups:
            group["lr"] = _lr_at(lr, step, args.warmup)
        losses = module(batch, x_t, v_star, sigma)
        acc.backward(losses["loss"])
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step == start_step or step + 1 == steps:
            rec = {"stage": stage, "step": step + 1, "steps": steps, "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(time.perf_counter() - t0, 2), "processes": world,
                   **{k: round(float(acc.gather(v.detach().reshape(1)).mean()), 6) for k, v in losses.items()
                      if not k.startswith("probe_mse_")}}
            if stage == 1:
                rec["probe_mse"] = [round(float(losses[f"probe_mse_{l}"]), 6)
                                    for l in sorted(int(k.split("_")[-1]) for k in losses if k.startswith("probe_mse_"))]
            log(rec)
        budget["done"] += 1
        stop = args.stop_after is not None and budget["done"] >= args.stop_after and step + 1 < steps
        if acc.is_main_process and ((step + 1) % args.save_every == 0 or step + 1 == steps or stop):
            save_checkpoint(out, stage, step + 1, acc.unwrap_model(module).trainable, opt, run_state)
        acc.wait_for_everyone()
        if stop:
            raise StopTraining(f"stopped after {budget['done']} steps (stage {stage}, step {step + 1}/{steps})")
    budget.setdefault("steps_done", {})[stage] = steps


def _set_stage_trainable(critic, stage: int) -> None:
    """Let only the parameters that ``stage`` trains require a gradient. Stage 2 (critique mode, loss on the error
    map alone) never reaches the steering adapters, the decoupled-attention gates, nor the critic adapters of the
    blocks after the last critique block: they are frozen there and unfrozen for stage 3, which trains everything.

    Under ``accelerate launch`` the stage module is wrapped in ``DistributedDataParallel``, which expects a gradient
    for every parameter that requires one and fails on the second step otherwise. On one process nothing changes:
    these parameters never had a gradient in stage 2, and AdamW (weight decay included) and gradient clipping skip
    parameters without one."""
    critic.requires_grad_(True)
    if stage != 2:
        return
    critic.steer_adapters.requires_grad_(False)
    critic.gates.requires_grad_(False)
    last = max(critic.config.l_c)
    for block, adapter in critic.adapters.items():
        if int(block) > last:
            adapter.requires_grad_(False)


def _init_tokens_from_text(transformer, critic, data, handle, n: int = 16) -> None:
    """Start the critic tokens at the mean text-stream state entering block l_in (an in-distribution vector)."""
    import torch

    from .apply import family_of

    blk = family_of(transformer).blocks(transformer)[critic.config.l_in]
    seen = []

    def hook(module, args, kwargs):
        from .runtime import BoundArgs

        ehs = BoundArgs(module, args, kwargs).get("encoder_hidden_states")
        seen.append(ehs[:, :-critic.config.n_tokens].float().mean(dim=(0, 1)))

    h = blk.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), handle.session(mode="critique"):
            batch = data.batch(torch.arange(min(n, len(data))))
            x_t, _, sigma = data.noised(batch, torch.Generator().manual_seed(0))
            data.forward(transformer, batch, x_t, sigma)
    finally:
        h.remove()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        critic.tokens.copy_(seen[0].expand_as(critic.tokens)
                            + 0.02 * torch.randn(critic.tokens.shape, generator=g) * seen[0].std())


def _validate(transformer, data, handle, mode: str, seed: int = 123, batch_size: int = 32) -> dict:
    """Validation on fixed noise: flow-matching MSE with the critic in ``mode`` and off, critique MSE and rho."""
    import torch
    import torch.nn.functional as F

    from . import core

    sums = {"fm_off": 0.0, "fm": 0.0, "fm_edit_off": 0.0, "fm_edit": 0.0, "crit_mse": 0.0, "rho": 0.0}
    n = 0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(data)))
            batch = data.batch(idx)
            x_t, v_star, sigma = data.noised(batch, g)
            with handle.session(mode="off"):
                v_off = data.forward(transformer, batch, x_t, sigma)
            with handle.session(mode=mode):
                v = data.forward(transformer, batch, x_t, sigma)
                e_hat = handle.last_call.error_map()
            target = core.log_normalise(core.token_errors(v, v_star))
            b = len(idx)
            for key, out in (("fm_off", v_off), ("fm", v)):
                fm, fm_edit = core.fm_sums(out, v_star, batch.get("edit_tokens"))
                sums[key] += fm * b
                sums[key.replace("fm", "fm_edit")] += (fm_edit or 0.0) * b
            sums["crit_mse"] += F.mse_loss(e_hat, target).item() * b
            sums["rho"] += float(core.spearman(e_hat, target).nanmean()) * b
            n += b
    return {k: round(v / n, 6) for k, v in sums.items()}


def run(args) -> int:
    import torch
    from accelerate import Accelerator

    from ..errors import EditSteerConfigError
    from ..toy.editor import load_toy_editor
    from .apply import apply_inline_critic, critic_config_for, describe_transformer
    from .data import KontextEditData
    from .module import InlineCritic, ProbeHeads
    from .probe import format_curve, plot_curves, probe_curve

    stages = sorted({int(s) for s in str(args.stages).split(",") if s.strip()})
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise EditSteerConfigError(f"--stages must list stages among 1,2,3; got {args.stages!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    acc = Accelerator()
    out = Path(args.out)
    command = "editsteer train critic " + " ".join(sys.argv[sys.argv.index("critic") + 1:]) \
        if "critic" in sys.argv else "editsteer train critic"
    resume = load_checkpoint_state(out) if args.resume else None
    if args.resume and resume is None and acc.is_main_process:
        print(f"no checkpoint in {out}/checkpoints/latest: starting from scratch", file=sys.stderr)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (out / "log.jsonl").write_text("")
        (out / "args.json").write_text(json.dumps({**vars(args), "command": command,
                                                   "processes": acc.num_processes}, indent=2, default=str) + "\n")
    t_start = time.perf_counter()

    def log(rec: dict) -> None:
        if not acc.is_main_process:
            return
        rec = {**rec, "wall_s": round(time.perf_counter() - t_start, 2)}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        keys = [k for k in ("loss", "l_fm", "l_crit", "rho") if k in rec]
        msg = " ".join(f"{k}={rec[k]:.4f}" for k in keys)
        if "event" in rec:
            msg = rec["event"] + (" " + msg if msg else "")
        print(f"[critic stage {rec.get('stage', '-')}] step {rec.get('step', '-')}/{rec.get('steps', '-')} {msg} "
              f"({rec['wall_s']:.0f}s)", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    pipe, where = load_toy_editor(args.model, device=str(acc.device))
    transformer = pipe.transformer
    transformer.requires_grad_(False).eval()
    desc = describe_transformer(transformer)
    data = KontextEditData.from_toy_world(pipe, args.cases, split="train", seed=args.seed)
    val = KontextEditData.from_toy_world(pipe, args.val_cases, split="train", seed=args.seed + 1)
    run_state = {"stages": stages, "stages_done": [], "l_in": None, "l_c": None, "model": where,
                 "command": command}
    if resume is not None:
        run_state.update({k: resume[k] for k in ("stages_done", "l_in", "l_c") if k in resume})
    summary: dict = {"model": where, "backbone": desc, "stages": stages, "command": command,
                     "processes": acc.num_processes, "threads": torch.get_num_threads(),
                     "train_cases": args.cases, "batch_size": args.batch_size}
    if (out / "summary.json").is_file() and resume is not None:
        summary = {**json.loads((out / "summary.json").read_text()), **summary}

    budget = {"done": 0}
    if args.max_minutes is not None:
        if args.max_minutes <= 0:
            raise EditSteerConfigError(f"--max-minutes must be positive, got {args.max_minutes}")
        todo = {s: getattr(args, f"steps{s}") for s in stages}
        budget["seconds"] = {s: 60.0 * args.max_minutes * n / max(1, sum(todo.values())) for s, n in todo.items()}
    critic = handle = None
    try:
        # -- stage 1: probes ---------------------------------------------------------------------------------------
        if 1 in stages:
            probes_file = out / "stage1" / "probes.safetensors"
            if 1 not in run_state["stages_done"]:
                probes = ProbeHeads(desc["width"], desc["out_dim"], range(desc["depth"]), hidden=args.head_hidden,
                                    arch=desc["arch"], base_model=str(where)).init_from(transformer)
                start = 0
                if resume is not None and resume.get("stage") == 1:
                    probes = ProbeHeads.load(out / "checkpoints" / "latest" / "probes.safetensors")
                    start = resume["step"]
                log({"stage": 1, "event": f"probe heads for {desc['depth']} blocks", "step": start, "steps": args.steps1})
                _train_stage(acc, 1, args.steps1, start, transformer, probes, data, None, args, out, run_state,
                             args.lr_probe, log, budget)
                if acc.is_main_process:
                    probes.save(probes_file)
                run_state["stages_done"].append(1)
            probes = ProbeHeads.load(probes_file)
            lens = probe_curve(transformer, val, None, threshold=args.rho_threshold, seed=args.seed)
            trained = probe_curve(transformer, val, probes, threshold=args.rho_threshold, seed=args.seed)
            summary["probe_curve"] = {"logit_lens": lens["rho_mean"], "trained_probes": trained["rho_mean"],
                                      "suggested_l_in": trained["suggested_l_in"]}
            if acc.is_main_process:
                print(format_curve(trained), file=sys.stderr)
                plot_curves(out / "stage1" / "probe.png", {"logit lens": lens["rho_mean"],
                                                           "trained probes": trained["rho_mean"]},
                            threshold=args.rho_threshold, title="stage 1: rho(layer error map, final error map)")
            auto_l_in = trained["suggested_l_in"]
        else:
            auto_l_in = None

        # -- the critic ----------------------------------------------------------------------------------------------
        if run_state["l_in"] is None:
            if args.l_in == "auto":
                if auto_l_in is None:  # no stage 1: the zero-training logit lens picks the layer
                    auto_l_in = probe_curve(transformer, val, None, threshold=args.rho_threshold,
                                            seed=args.seed)["suggested_l_in"]
                l_in = min(auto_l_in, desc["depth"] - 2)
            else:
                l_in = args.l_in[0]
            l_c = None if args.l_c == "auto" else tuple(args.l_c)
            run_state["l_in"], run_state["l_c"] = l_in, l_c
        cfg_kwargs = dict(l_in=run_state["l_in"], n_tokens=args.n_tokens, adapter_rank=args.adapter_rank,
                          head_hidden=args.head_hidden, steer_start=args.steer_start,
                          steer_attention=args.steer_attention, steer_rank=args.steer_rank,
                          steer_conditioned=not args.steer_unconditioned,
                          base_model=str(args.model or "toy-kontext-editor"))
        if run_state["l_c"] is not None:
            cfg_kwargs["l_c"] = tuple(run_state["l_c"])
        critic_stages = [s for s in stages if s > 1]
        if critic_stages:
            latest = out / "checkpoints" / "latest" / "critic.safetensors"
            loaded = True
            if resume is not None and resume.get("stage", 0) > 1 and latest.is_file():
                critic = InlineCritic.load_file(latest)
            else:
                torch.manual_seed(args.seed + 1)
                critic = InlineCritic(critic_config_for(transformer, **cfg_kwargs))
                loaded = False
            critic.to(acc.device).train()
            run_state["l_c"] = list(critic.config.l_c)
            handle = apply_inline_critic(transformer, critic, mode="off")
            if not loaded:
                _init_tokens_from_text(transformer, critic, data, handle)
            log({"event": f"critic: l_in={critic.config.l_in} l_c={list(critic.config.l_c)} n_c={critic.config.n_tokens}"
                          f" adapter_rank={critic.config.adapter_rank} params={sum(p.numel() for p in critic.parameters())}"})
            for stage in critic_stages:
                if stage in run_state["stages_done"]:
                    continue
                start = resume["step"] if resume is not None and resume.get("stage") == stage else 0
                steps = args.steps2 if stage == 2 else args.steps3
                mode = "critique" if stage == 2 else "steer"
                handle.set_mode(mode)
                _set_stage_trainable(critic, stage)
                log({"stage": stage, "event": f"mode={mode}", "step": start, "steps": steps})
                _train_stage(acc, stage, steps, start, transformer, critic, data, handle, args, out, run_state,
                             args.lr, log, budget)
                run_state["stages_done"].append(stage)
                critic.config.stage = stage
                critic.config.mode = mode
                v = _validate(transformer, val, handle, mode)
                summary[f"stage{stage}_val"] = v
                log({"stage": stage, "event": "validation " + json.dumps(v)})
                if acc.is_main_process:
                    critic.save_pretrained(out / "critic")
                    save_checkpoint(out, stage, steps, critic, torch.optim.AdamW(critic.parameters()), run_state)
            handle.remove()
    except StopTraining as e:
        if handle is not None:
            handle.remove()
        log({"event": f"{e}; continue with --resume"})
        return 0

    summary["wall_s_this_run"] = round(time.perf_counter() - t_start, 1)
    summary["steps_done"] = {str(k): v for k, v in budget.get("steps_done", {}).items()}
    summary["max_minutes"] = args.max_minutes
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if critic is not None and args.export:
            export(critic, Path(args.export), args.register, command, args.description, summary)
    acc.wait_for_everyone()
    return 0


def export(critic, folder: Path, register: str | None, command: str, description: str | None,
           record: dict | None = None) -> None:
    """Write the critic's Hub-ready folder (``save_pretrained``: ``critic.safetensors``, ``config.json``,
    ``README.md``) plus ``training.json`` (the run's record) to ``folder`` and, with ``register``, its manifest
    entry (status unpublished, ``repo_id`` ``editsteer/<id>``, ``produced_by`` = the command, the record in
    ``extra.training``)."""
    from ..weights import entry_from_folder, write_entry

    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            f.unlink()
    critic.eval()
    critic.save_pretrained(folder)
    if record is not None:
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported the critic to {folder}", file=sys.stderr)
    if register:
        c = critic.config
        art = entry_from_folder(
            folder, id=register, kind="folder", base_model="flux-kontext", license="apache-2.0",
            status="unpublished", repo_id=f"editsteer/{register}", bundled_path=register, produced_by=command,
            description=description or (f"Inline Critic for the toy Kontext editor (stage {c.stage}, n_c="
                                        f"{c.n_tokens}, l_in={c.l_in}, l_c={list(c.l_c)}, adapter rank "
                                        f"{c.adapter_rank}"
                                        + (f", steering adapters rank {c.steer_rank}" if c.steer_rank else "")
                                        + ")"),
            extra={"critic": {k: v for k, v in c.metadata().items() if k not in ("config", "format")},
                   **({"training": record} if record is not None else {})})
        print(f"registered weights_manifest/{write_entry(art).name}", file=sys.stderr)

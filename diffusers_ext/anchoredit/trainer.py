"""The training loops behind ``editsteer train anchoredit`` (see :mod:`diffusers_ext.anchoredit.train`).

One :class:`_Phase` loop serves every stage: it runs ``steps`` optimizer steps of a loss function under accelerate,
clips gradients, keeps an EMA when asked, logs to ``OUT/train_log.jsonl``, writes ``OUT/training_state`` every
``--save-every`` steps and on exit, and resumes from it. The randomness of step ``i`` of phase ``p`` comes only from
``torch.Generator().manual_seed(hash(seed, p, i))``, so a resumed run equals an uninterrupted one.

Under ``accelerate launch`` every process runs the same loop, so each step draws from two generators
(:class:`StepRandom`): ``shared`` (the same on every process) for the decisions that fix the step's graph, which the
processes must agree on for FSDP/DDP to stay in step (number of turns, the target turn ``k``, DMD's backward-simulation
depth ``s``); and ``local`` (seeded with the process index as well) for everything per sample: which samples, noise,
timesteps, degradations, self-rollout choices. Otherwise every GPU would train on the same batch. A single process
uses one generator for both, so it draws exactly what it drew before the split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import EditSteerConfigError
from .apply import anchoredit_forward, apply_anchoredit, get_runtime, remove_anchoredit
from .config import AnchorEditConfig, SamplerConfig
from .objectives import (
    DegradationConfig,
    FrameTimestepConfig,
    add_noise,
    cd_grid,
    degrade_history,
    dmd_generator_target,
    sample_frame_timesteps,
    self_rollout_replace,
    turn_weighted_mse,
    turn_weights,
    x0_from_v,
)

logger = logging.getLogger(__name__)
STATE_DIR = "training_state"
RECORD = "editsteer_train.json"


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{phase}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class StepRandom:
    """The generators of one training step (see the module docstring): ``shared`` for decisions every process must
    make alike (they shape the step's graph), ``local`` for this process's samples, noise and timesteps."""

    shared: torch.Generator
    local: torch.Generator


def step_random(seed: int, phase: str, step: int, process_index: int = 0, num_processes: int = 1) -> StepRandom:
    """The generators of step ``step`` of ``phase`` on process ``process_index`` of ``num_processes``.

    One process: ``shared is local`` (one stream, the draws of a single-process run are unchanged). Several:
    ``local`` hashes the process index too, so each process draws its own data, noise and timesteps."""
    shared = step_generator(seed, phase, step)
    if num_processes <= 1:
        return StepRandom(shared, shared)
    return StepRandom(shared, step_generator(seed, f"{phase}/rank{process_index}", step))


def _randn(shape, g, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(like.device, like.dtype)


def _uniform_t(batch: int, g, lo: int = 20, hi: int = 980) -> torch.Tensor:
    return (lo + torch.rand(batch, generator=g) * (hi - lo)).floor()


def _logit_normal_t(batch: int, g, lo: int = 20, hi: int = 980) -> torch.Tensor:
    u = torch.sigmoid(torch.randn(batch, generator=g))
    return (lo + u * (hi - lo)).floor()


# --------------------------------------------------------------------------------------------------------------
# the shared loop


class _Run:
    """Output folder, training record and wall-time budget of one ``editsteer train anchoredit`` invocation."""

    def __init__(self, args, acc, process: tuple[int, int] | None = None):
        self.args, self.acc = args, acc
        # (process index, process count) of the step randomness: accelerate's, or simulated (tests)
        self.process = (acc.process_index, acc.num_processes) if process is None else tuple(process)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = self.out / STATE_DIR
        self.t0 = time.perf_counter()
        self.record = {"stage": args.stage, "command": "editsteer train anchoredit " + " ".join(sys.argv[3:])
                       if sys.argv[1:3] == ["train", "anchoredit"] else " ".join(sys.argv),
                       "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "phases": {}}
        rec = self.out / RECORD
        if args.resume and rec.is_file():
            old = json.loads(rec.read_text())
            self.record["phases"] = old.get("phases", {})
            self.record["resumed_from"] = old.get("command")
        self.record.update({"threads": torch.get_num_threads(), "torch": torch.__version__,
                            "processes": acc.num_processes, "device": str(acc.device)})
        try:
            import diffusers

            self.record["diffusers"] = diffusers.__version__
        except Exception:  # pragma: no cover
            pass

    def out_of_time(self) -> bool:
        m = self.args.max_minutes
        return m is not None and (time.perf_counter() - self.t0) > 60 * m

    def progress(self) -> dict:
        p = self.state / "progress.json"
        if self.args.resume and p.is_file():
            return json.loads(p.read_text())
        return {}

    def write_record(self) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RECORD).write_text(json.dumps(self.record, indent=2, default=str) + "\n")

    def log(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class _Phase:
    """``steps`` optimizer steps of ``loss_fn(step, rng) -> (loss, logs)`` on ``model`` (already prepared);
    ``rng`` is the step's :class:`StepRandom`."""

    def __init__(self, run: _Run, name: str, steps: int, model, optimizer, scheduler, ema=None,
                 ema_decay: float = 0.0, extra_models: dict | None = None):
        self.run, self.name, self.steps = run, name, steps
        self.model, self.opt, self.sched = model, optimizer, scheduler
        self.ema, self.ema_decay = ema, ema_decay
        self.extra = extra_models or {}

    def _save(self, step: int, done: bool) -> None:
        run, acc = self.run, self.run.acc
        acc.wait_for_everyone()
        acc.save_state(str(run.state / self.name))
        if acc.is_main_process:
            from ..weights import save_safetensors

            if self.ema is not None:
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                                 run.state / self.name / "ema.safetensors")
            prog = {"phase": self.name, "step": step, "done": done}
            (run.state / "progress.json").write_text(json.dumps(prog) + "\n")
        run.write_record()

    def resume_step(self) -> int | None:
        """Where to start; None when this phase has already run its steps (its state is loaded either way, so
        later phases start from it)."""
        prog = self.run.progress()
        if not prog:
            return 0
        current = prog.get("phase") == self.name
        if not current and not self.run.record["phases"].get(self.name, {}).get("done"):
            return 0
        self.run.acc.load_state(str(self.run.state / self.name))
        if self.ema is not None:
            from ..weights import load_safetensors

            self.ema.load_state_dict(load_safetensors(self.run.state / self.name / "ema.safetensors"))
        if current and int(prog["step"]) < self.steps:
            return int(prog["step"])
        return None

    @torch.no_grad()
    def _ema_update(self) -> None:
        src = self.run.acc.unwrap_model(self.model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(self.ema_decay).add_(src[k].detach().to(v.dtype), alpha=1 - self.ema_decay)

    def run_loop(self, loss_fn) -> bool:
        """Returns True when the phase finished (False: stopped by --max-minutes)."""
        run, acc, args = self.run, self.run.acc, self.run.args
        start = self.resume_step()
        info = run.record["phases"].setdefault(self.name, {"steps": 0, "wall_s": 0.0, "cpu_s": 0.0, "done": False})
        if start is None:
            return True
        t_phase, c_phase = time.perf_counter(), time.process_time()
        wall0, cpu0 = info["wall_s"], info.get("cpu_s", 0.0)
        finished = True
        step = start
        ema_losses: dict[str, float] = {}
        while step < self.steps:
            if run.out_of_time():
                finished = False
                break
            rng = step_random(args.seed, self.name, step, *run.process)
            self.model.train()
            with acc.accumulate(self.model):
                loss, logs = loss_fn(step, rng)
                acc.backward(loss)
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.opt.step()
                if self.sched is not None:
                    self.sched.step()
                self.opt.zero_grad(set_to_none=True)
            if self.ema is not None and acc.sync_gradients:
                self._ema_update()
            step += 1
            logs = {"loss": float(loss.detach()), **logs}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    ema_losses[k] = v if k not in ema_losses else 0.95 * ema_losses[k] + 0.05 * v
            if step % args.log_every == 0 or step == self.steps:
                wall = wall0 + time.perf_counter() - t_phase
                row = {"phase": self.name, "step": step, "wall_s": round(wall, 1),
                       "lr": self.opt.param_groups[0]["lr"], **{k: round(v, 6) for k, v in ema_losses.items()}}
                run.log(row)
                if acc.is_main_process:
                    print(json.dumps(row), flush=True)
            info.update(steps=step, wall_s=wall0 + time.perf_counter() - t_phase,
                         cpu_s=cpu0 + time.process_time() - c_phase)
            if step % args.save_every == 0 and step < self.steps:
                self._save(step, done=False)
        info.update(steps=step, wall_s=wall0 + time.perf_counter() - t_phase,
                    cpu_s=cpu0 + time.process_time() - c_phase, done=finished)
        self._save(step, done=finished)
        return finished


def _optimizer(params, lr, args, betas=(0.9, 0.999)):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=betas,
                            weight_decay=args.weight_decay)
    w = max(0, int(args.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w) if w else 1.0)
    return opt, sched


def _prepare_transformer(pipe, args, acc):
    """Stages 1-2: the whole transformer trains, with AnchorEdit's processors installed (``pipe.runtime()``)."""
    model = pipe.transformer
    pipe.runtime()
    model.requires_grad_(True)
    opt, sched = _optimizer(model.parameters(), args.lr, args)
    return acc.prepare(model, opt, sched)


# --------------------------------------------------------------------------------------------------------------
# entry


def train(args, *, process: tuple[int, int] | None = None) -> int:
    """Run ``args.stage``. ``process`` = (index, count) replaces accelerate's process index and count in the step
    randomness only (tests simulate the processes of a multi-GPU run with it)."""
    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage in ("1", "2", "3") and not args.init:
        raise EditSteerConfigError("--init is required: the pipeline folder of the previous stage (stage 1: a "
                                   "Wan2.1-T2V Diffusers folder, or the toy VAE stage's --out)")
    acc = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum)
    torch.manual_seed(args.seed)
    run = _Run(args, acc, process)
    if args.stage == "vae":
        _train_toy_vae(run)
        return 0
    pipe = _load_pipeline(run)
    data = _data(run, pipe)
    if args.stage == "1":
        ok = _stage1(run, pipe, data)
    elif args.stage == "2":
        ok = _stage2(run, pipe, data)
    else:
        ok = _stage3(run, pipe, data)
    run.record["finished"] = bool(ok)
    run.record["total_wall_s"] = sum(p.get("wall_s", 0.0) for p in run.record["phases"].values())
    run.record["process_wall_s"] = time.perf_counter() - run.t0
    run.record["process_cpu_s"] = time.process_time()
    run.write_record()
    return 0


def _load_pipeline(run: _Run):
    from .pipeline import AnchorEditPipeline

    args = run.args
    pipe = AnchorEditPipeline.from_pretrained(args.init, dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.anchoredit_config
    changes = {}
    if args.sink is not None:
        changes["sink"] = args.sink
    if args.window is not None:
        changes["window"] = None if args.window == 0 else args.window
    if args.rope_stride is not None:
        changes["rope_stride"] = args.rope_stride
    if changes:
        pipe.set_anchoredit(cfg.replace(**changes))
    pipe.to(run.acc.device)
    pipe.vae.requires_grad_(False).eval()
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False).eval()
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    run.record["init"] = str(args.init)
    run.record["anchoredit"] = pipe.anchoredit_config.to_dict()
    return pipe


def _data(run: _Run, pipe):
    from .data import JsonSequenceData, ToyWorldData

    args = run.args
    turns = max(args.max_turns, args.dmd_turns if args.stage == "3" else 0)
    if args.data == "toy":
        data = ToyWorldData(pipe, seed=args.seed, pool_cases=args.pool_cases, pool_sequences=args.pool_sequences,
                            max_turns=turns)
        t = time.perf_counter()
        data.warm(cases=args.stage == "1", sequences=args.stage in ("2", "3"))
        run.record["data_encode_s"] = round(time.perf_counter() - t, 1)
        return data
    return JsonSequenceData(pipe, args.data, max_turns=turns)


def _export(run: _Run, pipe, model, sampler: SamplerConfig) -> None:
    """Write the trained transformer into the pipeline folder ``--out`` (diffusers layout, safetensors)."""
    acc = run.acc
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        base = pipe.transformer
        base.load_state_dict({k: v.to(base.dtype) for k, v in state.items()})
        pipe.register_to_config(sampler=sampler.to_dict())
        pipe.save_pretrained(run.out, safe_serialization=True)
    run.write_record()


def _flow_sampler(args) -> SamplerConfig:
    return SamplerConfig.flow(steps=args.flow_steps, shift=args.flow_shift, guidance_scale=args.flow_guidance)


def _frame_timesteps(run) -> FrameTimestepConfig:
    return FrameTimestepConfig(monotonic=not run.args.no_monotonic)


# --------------------------------------------------------------------------------------------------------------
# stage 1: single-turn edits + null-instruction identity pairs


def _stage1(run: _Run, pipe, data) -> bool:
    args, acc = run.args, run.acc
    bs = args.batch_size or 32
    model, opt, sched = _prepare_transformer(pipe, args, acc)
    null = data.null
    ctx_t = float(pipe.anchoredit_config.context_timestep)

    def loss_fn(step, rng):
        g = rng.local  # every draw is per sample
        src, tgt, emb = data.pairs(g, bs)
        is_null = torch.rand(bs, generator=g) < args.null_prob
        tgt = torch.where(is_null.view(-1, 1, 1, 1).to(tgt.device), src, tgt)
        emb = torch.where(is_null.view(-1, 1, 1).to(emb.device), null.expand_as(emb), emb)
        x0 = torch.stack([src, tgt], 2)  # [B, C, 2, h, w]
        tt = _logit_normal_t(bs, g) if args.timestep_sampling == "logit-normal" else _uniform_t(bs, g)
        t = torch.stack([torch.full((bs,), ctx_t), tt], 1).to(x0.device)
        noise = _randn(x0.shape, g, x0)
        xt = add_noise(x0, noise, t)
        ctx = torch.stack([null.expand_as(emb), emb], 1)
        v = anchoredit_forward(model, xt, t, ctx)
        loss = F.mse_loss(v[:, :, 1].float(), (noise - x0)[:, :, 1].float())
        return loss, {"null_share": float(is_null.float().mean())}

    ok = _Phase(run, "stage1", args.steps, model, opt, sched).run_loop(loss_fn)
    _export(run, pipe, model, _flow_sampler(args))
    return ok


# --------------------------------------------------------------------------------------------------------------
# stage 2: causal AR forcing


def _vae_roundtrip(pipe):
    def rt(lat: torch.Tensor) -> torch.Tensor:  # [N, C, h, w] normalised latents
        z = lat.unsqueeze(2)
        mean, std = pipe._latent_stats(z.device, z.dtype)
        img = pipe.vae.decode(z * std + mean).sample
        back = pipe.vae.encode(img).latent_dist.mode()
        mean, std = pipe._latent_stats(back.device, back.dtype)
        return ((back - mean) / std)[:, :, 0]
    return rt


def _stage2(run: _Run, pipe, data) -> bool:
    args, acc = run.args, run.acc
    bs = args.batch_size or 8
    model, opt, sched = _prepare_transformer(pipe, args, acc)
    tcfg = _frame_timesteps(run)
    dcfg = DegradationConfig(enable=not args.no_degradation, monotonic=not args.no_monotonic)
    vae_rt = _vae_roundtrip(pipe)
    distributed = acc.num_processes > 1
    if not 1 <= args.min_turns <= args.max_turns:
        raise EditSteerConfigError("need 1 <= --min-turns <= --max-turns")

    def loss_fn(step, rng):
        g = rng.local
        turns = int(torch.randint(args.min_turns, args.max_turns + 1, (1,), generator=rng.shared))  # sequence length
        lat, ctx = data.sequences(g, bs, turns)  # [B, C, T, h, w], [B, T, L, D]
        lat, ctx = lat.to(acc.device), ctx.to(acc.device)
        frames = turns + 1
        t = sample_frame_timesteps(bs, frames, g, tcfg).to(lat.device)
        clean = torch.zeros(bs, frames, dtype=torch.bool)
        if args.clean_history_prob > 0 and frames > 1:  # clean history before a random cut, as at inference
            pick = torch.rand(bs, generator=g) < args.clean_history_prob
            cut = torch.randint(1, frames, (bs,), generator=g)
            clean = pick[:, None] & (torch.arange(frames)[None] < cut[:, None])
            t = torch.where(clean.to(t.device), torch.full_like(t, float(pipe.anchoredit_config.context_timestep)), t)
        noise = _randn(lat.shape, g, lat)
        active = args.self_forcing_prob > 0 and step >= args.self_forcing_warmup and frames > 2
        replaced = torch.zeros(bs, frames, dtype=torch.bool)
        hist = lat
        if active or (distributed and args.self_forcing_prob > 0):  # FSDP: every rank runs the same forwards
            with torch.no_grad():
                xt = add_noise(lat, noise, t)
                x0p = x0_from_v(xt, anchoredit_forward(model, xt, t, ctx), t)
            if active:
                new, replaced = self_rollout_replace(lat.transpose(1, 2), x0p.transpose(1, 2),
                                                     args.self_forcing_prob, g)
                hist = new.transpose(1, 2)
        deg = degrade_history(hist.transpose(1, 2), g, dcfg, vae_rt).transpose(1, 2)
        xt = add_noise(deg, noise, t)
        v = anchoredit_forward(model, xt, t, ctx)
        w = turn_weights(bs, frames, args.turn_weight_alpha, replaced | clean)
        loss = turn_weighted_mse(v, noise - lat, w)
        return loss, {"turns": turns, "replaced": float(replaced[:, 1:].float().mean()),
                      "clean": float(clean[:, 1:].float().mean()),
                      "t_first": float(t[:, 0].mean()), "t_last": float(t[:, -1].mean())}

    ok = _Phase(run, "stage2", args.steps, model, opt, sched).run_loop(loss_fn)
    _export(run, pipe, model, _flow_sampler(args))
    return ok


# --------------------------------------------------------------------------------------------------------------
# stage 3: consistency distillation, then DMD


def _copy_model(pipe_transformer, cfg: AnchorEditConfig, trainable: bool, device):
    m = copy.deepcopy(pipe_transformer)
    apply_anchoredit(m, cfg)
    m.requires_grad_(trainable)
    return m.to(device).train(trainable)


def _cached(model, cache, x, t, ctx, write=False):
    tt = torch.full((x.shape[0],), float(t), device=x.device) if not torch.is_tensor(t) else t
    return anchoredit_forward(model, x, tt, ctx, cache=cache, write=write)


@torch.no_grad()
def _prefill(model, frames: torch.Tensor, ctx: torch.Tensor, ctx_t: float):
    """A cache of ``model`` holding ``frames`` [B, C, k, h, w] written at ``ctx_t`` with contexts [B, k, L, D]."""
    cache = get_runtime(model).new_cache()
    for j in range(frames.shape[2]):
        _cached(model, cache, frames[:, :, j:j + 1], ctx_t, ctx[:, j:j + 1], write=True)
    return cache


@torch.no_grad()
def _rollout(model, source, ctx, turns: int, steps, g, ctx_t: float, cache=None):
    """4-step self-rollout of turns 1..turns (contexts ``ctx`` [B, turns+1, L, D]); returns (frames, cache)."""
    if cache is None:
        cache = _prefill(model, source, ctx[:, :1], ctx_t)
    outs = []
    for i in range(1, turns + 1):
        x = _randn(source.shape, g, source)
        for j, t in enumerate(steps):
            x0 = x0_from_v(x, _cached(model, cache, x, t, ctx[:, i:i + 1]), torch.full((x.shape[0],), float(t)))
            if j + 1 < len(steps):
                x = add_noise(x0, _randn(x0.shape, g, x0), torch.full((x.shape[0],), float(steps[j + 1])))
        _cached(model, cache, x0, ctx_t, ctx[:, i:i + 1], write=True)
        outs.append(x0)
    frames = torch.cat(outs, 2) if outs else source[:, :, :0]
    return frames, cache


def _stage3(run: _Run, pipe, data) -> bool:
    args, acc = run.args, run.acc
    bs = args.batch_size or 8
    cfg = pipe.anchoredit_config
    ctx_t = float(cfg.context_timestep)
    steps = list(SamplerConfig.distilled().timesteps)
    dev = acc.device
    base = pipe.transformer
    remove_anchoredit(base)
    teacher = _copy_model(base, cfg, False, dev).eval()  # the stage-2 model: CD teacher, DMD real score
    neg_text = args.negative_prompt if args.negative_prompt is not None else SamplerConfig().negative_prompt
    neg = pipe.encode_instructions([neg_text])[0]
    turns = args.dmd_turns
    ok = True

    def teacher_v(x, t, ctx, cache, guidance):
        v = _cached(teacher, cache, x, t, ctx)
        if guidance > 1.0:
            vu = _cached(teacher, cache, x, t, neg.expand(x.shape[0], 1, *neg.shape))
            v = vu + guidance * (v - vu)
        return v

    # ---- 3a: consistency distillation ------------------------------------------------------------------------
    student = _copy_model(base, cfg, True, dev)
    trained = student  # the (prepared) module whose weights are exported
    if args.cd_steps > 0:
        ema = _copy_model(base, cfg, False, dev).eval()
        opt, sched = _optimizer(student.parameters(), args.lr, args)
        student_p, opt, sched = acc.prepare(student, opt, sched)
        grid = cd_grid(args.cd_n, args.cd_shift)

        def cd_loss(step, rng):
            g = rng.local
            lat, ctx = data.sequences(g, bs, turns)
            lat, ctx = lat.to(dev), ctx.to(dev)
            k = int(torch.randint(1, turns + 1, (1,), generator=rng.shared))  # rollout and prefill length
            if args.cd_history == "rollout":
                hist, _ = _rollout(ema, lat[:, :, :1], ctx, k - 1, steps, g, ctx_t)
                history = torch.cat([lat[:, :, :1], hist], 2)
            else:
                history = lat[:, :, :k]
            tc = _prefill(teacher, history, ctx[:, :k], ctx_t)
            sc = _prefill(student, history, ctx[:, :k], ctx_t)
            ec = _prefill(ema, history, ctx[:, :k], ctx_t)
            i = int(torch.randint(0, args.cd_n - 1, (1,), generator=g))
            t, tn = float(grid[i]), float(grid[i + 1])
            ck = ctx[:, k:k + 1]
            xt = add_noise(lat[:, :, k:k + 1], _randn(lat[:, :, k:k + 1].shape, g, lat), torch.full((bs,), t))
            with torch.no_grad():
                x_next = xt - (t - tn) / 1000.0 * teacher_v(xt, t, ck, tc, args.teacher_guidance)
                target = x0_from_v(x_next, _cached(ema, ec, x_next, tn, ck), torch.full((bs,), tn))
            pred = x0_from_v(xt, _cached(student_p, sc, xt, t, ck), torch.full((bs,), t))
            return F.mse_loss(pred.float(), target.float()), {"k": k, "t": t}

        ok = _Phase(run, "cd", args.cd_steps, student_p, opt, sched, ema=ema,
                    ema_decay=args.ema_decay).run_loop(cd_loss)
        student = acc.unwrap_model(student_p)
        # DMD starts from the EMA student (the released configs prefer EMA weights)
        student.load_state_dict(ema.state_dict())
        trained = student_p
        del ema
    if not ok:
        _export(run, pipe, trained, SamplerConfig.distilled())
        return False

    # ---- 3b: DMD ---------------------------------------------------------------------------------------------
    if args.dmd_steps > 0:
        fake = _copy_model(base, cfg, True, dev)
        lr_c = args.lr_critic if args.lr_critic is not None else args.lr
        lr_g = args.lr_gen if args.lr_gen is not None else 0.2 * args.lr
        opt_g, sched_g = _optimizer(student.parameters(), lr_g, args, betas=(0.0, 0.999))
        opt_c, sched_c = _optimizer(fake.parameters(), lr_c, args, betas=(0.0, 0.999))
        gen_p, fake_p, opt_g, opt_c, sched_g, sched_c = acc.prepare(student, fake, opt_g, opt_c, sched_g, sched_c)
        ratio = max(1, args.gen_update_ratio)

        def full_x0(model, noisy, tfull, ctx, k):
            return x0_from_v(noisy, anchoredit_forward(model, noisy, tfull, ctx), tfull)[:, :, k:k + 1]

        def real_x0(noisy, tfull, ctx, k):
            x = full_x0(teacher, noisy, tfull, ctx, k)
            if args.real_guidance > 0:
                un = neg.expand(ctx.shape[0], ctx.shape[1], *neg.shape).clone()
                un[:, 0] = ctx[:, 0]
                xu = full_x0(teacher, noisy, tfull, un, k)
                x = x + args.real_guidance * (x - xu)
            return x

        class _Both(torch.nn.Module):  # one object for the phase loop: the step decides which part learns
            def __init__(self):
                super().__init__()
                self.gen, self.fake = gen_p, fake_p

        both = _Both()

        class _OptPair:
            param_groups = opt_g.param_groups

            def __init__(self):
                self.which = "gen"

            def step(self):
                (opt_g if self.which == "gen" else opt_c).step()

            def zero_grad(self, set_to_none=True):
                opt_g.zero_grad(set_to_none=set_to_none)
                opt_c.zero_grad(set_to_none=set_to_none)

        pair = _OptPair()

        class _SchedPair:
            def step(self):
                (sched_g if pair.which == "gen" else sched_c).step()

        def dmd_loss(step, rng):
            g = rng.local
            lat, ctx = data.sequences(g, bs, turns)
            lat, ctx = lat.to(dev), ctx.to(dev)
            k = int(torch.randint(1, turns + 1, (1,), generator=rng.shared))  # rollout length
            src = lat[:, :, :1]
            gen_turn = step % ratio == 0
            pair.which = "gen" if gen_turn else "critic"
            hist, cache = _rollout(gen_p, src, ctx, k - 1, steps, g, ctx_t)
            ck = ctx[:, k:k + 1]
            if gen_turn:
                s = int(torch.randint(0, len(steps), (1,), generator=rng.shared))  # generator passes
                with torch.no_grad():
                    x = _randn(src.shape, g, src)
                    for j in range(s):  # backward simulation from pure noise to steps[s]
                        x0 = x0_from_v(x, _cached(gen_p, cache, x, steps[j], ck), torch.full((bs,), steps[j]))
                        x = add_noise(x0, _randn(x0.shape, g, x0), torch.full((bs,), float(steps[j + 1])))
                x0_k = x0_from_v(x, _cached(gen_p, cache, x, steps[s], ck), torch.full((bs,), float(steps[s])))
                clean = torch.cat([src, hist, x0_k.detach()], 2)
                ts = _uniform_t(bs, g).to(dev)
                tfull = torch.zeros(bs, k + 1, device=dev)
                tfull[:, k] = ts
                noisy = clean.clone()
                noisy[:, :, k:k + 1] = add_noise(clean[:, :, k:k + 1], _randn(x0_k.shape, g, x0_k), ts)
                with torch.no_grad():
                    xr = real_x0(noisy, tfull, ctx[:, :k + 1], k)
                    xf = full_x0(fake_p, noisy, tfull, ctx[:, :k + 1], k)
                target = dmd_generator_target(x0_k, xr, xf)
                loss = 0.5 * F.mse_loss(x0_k.double(), target).float()
                return loss, {"k": k, "gen": 1.0}
            with torch.no_grad():
                x = _randn(src.shape, g, src)
                for j, t in enumerate(steps):
                    x0 = x0_from_v(x, _cached(gen_p, cache, x, t, ck), torch.full((bs,), float(t)))
                    if j + 1 < len(steps):
                        x = add_noise(x0, _randn(x0.shape, g, x0), torch.full((bs,), float(steps[j + 1])))
                clean = torch.cat([src, hist, x0], 2)
                ts = _uniform_t(bs, g).to(dev)
                tfull = torch.zeros(bs, k + 1, device=dev)
                tfull[:, k] = ts
                eps = _randn(x0.shape, g, x0)
                noisy = clean.clone()
                noisy[:, :, k:k + 1] = add_noise(x0, eps, ts)
            v = anchoredit_forward(fake_p, noisy, tfull, ctx[:, :k + 1])[:, :, k:k + 1]
            return F.mse_loss(v.float(), (eps - x0).float()), {"k": k, "gen": 0.0}

        ok = _Phase(run, "dmd", args.dmd_steps, both, pair, _SchedPair(),
                    extra_models={"fake": fake_p}).run_loop(dmd_loss)
        trained = gen_p
    _export(run, pipe, trained, SamplerConfig.distilled())
    return ok


# --------------------------------------------------------------------------------------------------------------
# toy VAE


def _train_toy_vae(run: _Run) -> None:
    import numpy as np

    from ..toy import world as W
    from .toy import ToyAnchorEditSpec, toy_pipeline, toy_vae

    args, acc = run.args, run.acc
    spec = ToyAnchorEditSpec()
    vae = toy_vae(spec, seed=args.seed)
    bs = args.batch_size or 32
    opt, sched = _optimizer(vae.parameters(), args.lr, args)
    total = args.steps

    def cosine(s):
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    vae_p, opt, sched = acc.prepare(vae, opt, sched)

    def batch(g, n):
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=g)))
        imgs = [W.render(W.random_scene(rng, 1, W.MAX_OBJECTS)) for _ in range(n)]
        return W.to_tensor(np.stack(imgs)).unsqueeze(2).to(acc.device)

    def loss_fn(step, rng):
        g = rng.local
        m = acc.unwrap_model(vae_p)
        x = batch(g, bs)
        z = m.encode(x).latent_dist.mode()
        rec = m.decode(z + 0.02 * _randn(z.shape, g, z)).sample
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-4 * z.square().mean()
        return loss, {}

    ok = _Phase(run, "vae", total, vae_p, opt, sched).run_loop(loss_fn)
    vae = acc.unwrap_model(vae_p).eval()
    with torch.no_grad():  # latent statistics -> latents_mean / latents_std, and a reconstruction check
        x = batch(step_generator(args.seed, "vae-stats", 0), 256)
        z = vae.encode(x).latent_dist.mode()
        mean = z.mean(dim=(0, 2, 3, 4)).tolist()
        std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3).tolist()
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).square().mean().item()
    run.record["vae_reconstruction_psnr"] = round(-10 * math.log10(max(mse, 1e-12)), 2)
    final = toy_vae(spec, seed=args.seed, latents_mean=mean, latents_std=std)
    final.load_state_dict(vae.state_dict())
    if acc.is_main_process:
        pipe = toy_pipeline(spec, seed=args.seed, vae=final, sampler=_flow_sampler(args))
        pipe.save_pretrained(run.out, safe_serialization=True)
    run.record["finished"] = bool(ok)
    run.write_record()

"""Calibrate VeriLatent's constants for a model on toy-world *train* cases (never the held-out split).

For every case it runs a pool of P candidates (seeds ``s + j``) to the end once, recording what the search would see
after k = 1..K early steps (x̂0, the source tokens, the attention map) and the decoded finals with their ground-truth
success. Any search policy (fixed, adaptive, best-of-N with the pixel verifier) is then replayed offline on the pool,
so a grid of constants costs no extra model call. Ground truth is used only to *score* policies here, never inside a
verifier.

    python -m diffusers_ext.verilatent.calibrate collect --cases 96 --pool 16 --out runs/verilatent/calib
    python -m diffusers_ext.verilatent.calibrate sweep runs/verilatent/calib/pool.pt

``sweep`` prints the selection accuracy of each verifier setting at fixed budgets, and the adaptive frontier
(success vs mean NFE over ``tau_easy``) of the best settings; it writes ``sweep.json`` next to the pool.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import core
from .config import VeriLatentConfig


def collect(args) -> int:
    from ..toy import metrics as M
    from ..toy import world as W
    from ..toy.editor import load_toy_editor, toy_pipeline_kwargs
    from .attention import AttentionCapture
    from .diffusers_wrapper import _grids, _PipelineState, _source_tokens, _Tap

    torch.set_num_threads(args.threads)
    pipe, where = load_toy_editor(args.model)
    kw = toy_pipeline_kwargs(pipe, num_inference_steps=args.steps)
    T, P, K = int(kw["num_inference_steps"]), args.pool, args.kmax
    cases = []
    t_start = time.perf_counter()
    state = _PipelineState(pipe)
    try:
        tap = _Tap(pipe.transformer, state)
        att = AttentionCapture(None)
        att.install(pipe.transformer, state)
        tap.listeners.append(att.on_forward)
        for i in range(args.cases):
            case = W.make_case(args.split, args.seed, i)
            seed = args.seed * 100_003 + i
            x0s, atts, cap = [], [], {}
            att.start(P)

            def cb(p, step, t, k):
                tap.step_calls = 0
                if step < K:
                    lat = k["latents"]
                    n = lat.shape[1]
                    sig, si = p.scheduler.sigmas, p.scheduler.step_index
                    x0s.append(core.predicted_clean(tap.x_in[:, :n], lat, float(sig[si - 1]), float(sig[si])).float())
                    atts.append(att.result()[:, :n])
                    if "source" not in cap:
                        tgt, src = _grids(tap.first_kwargs, n, tap.x_in.shape[1], 1.0)
                        cap["source"], cap["grid"] = _source_tokens(tap.x_in, n, tgt, src).float(), tgt
                return k

            tap.first_kwargs = None
            out = pipe(image=W.to_pil(case.source), prompt=case.instruction, num_images_per_prompt=P,
                       generator=[torch.Generator().manual_seed(seed + j) for j in range(P)], output_type="np",
                       callback_on_step_end=cb, **kw).images
            imgs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
            ms = [M.case_metrics(im, case.target, case.mask, case.source) for im in imgs]
            cases.append({
                "id": case.id, "family": case.family, "seed": seed, "source_img": torch.from_numpy(case.source),
                "finals": torch.from_numpy(imgs), "x0": torch.stack(x0s), "attention": torch.stack(atts),
                "source": cap["source"], "grid": cap["grid"],
                "success": torch.tensor([m["edit_success"] for m in ms], dtype=torch.float32),
                "region_mse": torch.tensor([m["edit_region_mse"] for m in ms], dtype=torch.float32),
                "background_psnr": torch.tensor([m["background_psnr"] for m in ms], dtype=torch.float32)})
            print(f"[calib] {i + 1}/{args.cases} {case.family:<10} success {float(cases[-1]['success'].mean()):.2f} "
                  f"{time.perf_counter() - t_start:.0f}s", file=sys.stderr, flush=True)
    finally:
        state.restore()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "loaded_from": where, "split": args.split, "seed": args.seed, "pool": P,
            "kmax": K, "steps": T, "cases": args.cases, "wall_s": time.perf_counter() - t_start,
            "command": " ".join(sys.argv), "threads": args.threads}
    torch.save({"meta": meta, "cases": cases}, out_dir / "pool.pt")  # our own tensors only; loaded weights_only
    (out_dir / "pool.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out_dir / 'pool.pt'} ({meta['wall_s']:.0f}s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Offline replay of policies
# ---------------------------------------------------------------------------------------------------------------------


def replay_search(case: dict, cfg: VeriLatentConfig, steps: int) -> tuple[int, int, str]:
    """(chosen candidate, NFE, bucket) of ``cfg`` on a recorded pool (top-1 finish)."""
    x0 = case["x0"][cfg.k - 1]
    att = case["attention"][cfg.k - 1] if cfg.activation != "latent" else None
    policy = core.BudgetPolicy(cfg)
    n, first = cfg.n0, None
    while True:
        j = core.judge(x0[:n], case["source"], cfg, None, None if att is None else att[:n])
        first = first if first is not None else j.easy
        more = policy.next_round(n, j)
        if more == 0:
            break
        n += more
    return j.ranking()[0], cfg.nfe(steps, n), core.bucket(first, j.easy)


def replay_bon(case: dict, n: int, cfg: VeriLatentConfig | None, pool: int = 2) -> int:
    """The candidate best-of-N picks among the first n decoded finals (``cfg=None``: the medoid verifier)."""
    if n == 1:
        return 0
    if cfg is None:
        return core.medoid_ranking(case["finals"][:n].float() / 255.0)[0]
    imgs = case["finals"][:n].float() / 255.0
    src = case["source_img"].float() / 255.0
    return core.judge_maps(core.pixel_activation(imgs, src, pool), cfg,
                           scale=core.source_scale(src.reshape(-1, 3))).ranking()[0]


def _judgements(cases: list[dict], cfg: VeriLatentConfig, sizes: tuple[int, ...]) -> list[dict[int, tuple]]:
    """Per case, per candidate count n: (best, margin, agreement, chosen) of the verifier on the first n."""
    out = []
    for c in cases:
        x0 = c["x0"][cfg.k - 1]
        att = c["attention"][cfg.k - 1] if cfg.activation != "latent" else None
        rec = {}
        for n in sizes:
            j = core.judge(x0[:n], c["source"], cfg, None, None if att is None else att[:n])
            d = j.difficulty
            rec[n] = (d.best, d.margin, d.agreement, j.ranking()[0])
        out.append(rec)
    return out


def _adaptive(cases, recs, n0, step, n_max, tau_easy, tau_agree, steps, k):
    ok, nfe, first_easy = [], [], []
    for c, rec in zip(cases, recs):
        n = n0
        while True:
            best, _, agree, chosen = rec[n]
            easy = best >= tau_easy and agree >= tau_agree
            if n == n0:
                first_easy.append(easy)
            if easy or n + step > n_max:
                break
            n += step
        ok.append(float(c["success"][chosen]))
        nfe.append(n * k + (steps - k))
    return float(np.mean(ok)), float(np.mean(nfe)), float(np.mean(first_easy))


def sweep(args) -> int:
    data = torch.load(args.pool, weights_only=True)
    cases, meta = data["cases"], data["meta"]
    T, pool = meta["steps"], meta["pool"]
    succ = torch.stack([c["success"] for c in cases])  # [cases, P]
    has_attention = any(float(c["attention"].abs().sum()) > 0 for c in cases)
    lines, out = [], {"meta": meta}
    single = float(succ[:, 0].mean())
    lines.append(f"{len(cases)} {meta['split']} cases, pool {pool}, T={T}; single-sample success {single:.3f}")
    out["single"] = single
    out["oracle"] = {n: float(succ[:, :n].max(1).values.mean()) for n in (2, 4, 8, 16) if n <= pool}
    lines.append("oracle (any candidate succeeds): " + ", ".join(f"N={n}: {v:.3f}" for n, v in out["oracle"].items()))
    out["bon"] = {}
    for n in (4, 8):
        for px in (1, 2, 4):
            for lam, mu in ((0.75, 0.1), (1.0, 0.1), (1.0, 0.3), (1.0, 1.0)):
                cfg = VeriLatentConfig(lam=lam, mu=mu)
                out["bon"][f"n{n}_pool{px}_lam{lam}_mu{mu}"] = float(np.mean(
                    [float(c["success"][replay_bon(c, n, cfg, px)]) for c in cases]))
        out["bon"][f"n{n}_medoid"] = float(np.mean([float(c["success"][replay_bon(c, n, None)]) for c in cases]))
        best = max((v, k) for k, v in out["bon"].items() if k.startswith(f"n{n}_"))
        lines.append(f"BoN-{n} pixel verifier: best {best[0]:.3f} ({best[1]})")
    sizes = tuple(n for n in (4, 8, 12, 16) if n <= pool)
    grid = {"k": list(range(1, meta["kmax"] + 1)), "lam": [0.75, 1.0], "mu": [0.1, 0.3, 1.0],
            "normalise": [("max", 0.1)], "leave_one_out": [True, False], "consensus": ["contrast", "mean"],
            "global_coverage": [0.6], "activation": ["latent", "attention", "mix"] if has_attention else ["latent"]}
    if args.full:
        grid.update(lam=[0.5, 0.75, 1.0], normalise=[("max", 0.1), ("softmax", 0.2)], global_coverage=[0.6, None])
    rows, all_recs = [], []
    for k, lam, mu, (nm, temp), loo, cons, gc, act in itertools.product(*grid.values()):
        over = dict(k=k, lam=lam, mu=mu, normalise=nm, temperature=temp, leave_one_out=loo, consensus=cons,
                    global_coverage=gc, activation=act)
        recs = _judgements(cases, VeriLatentConfig.fixed(4, **over), sizes)
        row = dict(over)
        for n in sizes:
            row[f"fixed{n}"] = float(np.mean([float(c["success"][r[n][3]]) for c, r in zip(cases, recs)]))
            row[f"fixed{n}_mse"] = float(np.mean([float(c["region_mse"][r[n][3]]) for c, r in zip(cases, recs)]))
        rows.append(row)
        all_recs.append(recs)
    order = sorted(range(len(rows)), key=lambda i: (-(rows[i]["fixed4"] + rows[i].get("fixed8", 0)),
                                                     rows[i]["fixed4_mse"]))
    out["fixed"] = [rows[i] for i in order]
    lines.append("best verifier settings (selection success at fixed N):")
    for i in order[: args.top]:
        lines.append("  " + json.dumps(rows[i]))
    frontier = []
    for i in order[: args.top]:
        recs, over = all_recs[i], {k: rows[i][k] for k in grid}
        bests = [r[4][0] for r in recs]
        agrees = [r[4][2] for r in recs]
        for q in np.linspace(0.0, 1.0, 11):
            tau = float(np.quantile(bests, q)) if q < 1 else 1e9
            for qa in (0.0, 0.25, 0.5):
                ta = float(np.quantile(agrees, qa)) if qa > 0 else -1.0
                for n_max in (8, 12, 16):
                    if n_max not in sizes:
                        continue
                    s_, nfe, easy1 = _adaptive(cases, recs, 4, 4, n_max, tau, ta, T, over["k"])
                    frontier.append({**over, "n_max": n_max, "tau_easy": tau, "tau_agreement": ta,
                                     "success": s_, "nfe": nfe, "easy_round_one": easy1})
    out["adaptive"] = frontier
    lines.append("adaptive: best success at mean NFE <= 40% of BoN-8 (" + f"{0.4 * 8 * T:.1f}):")
    ok = sorted([f for f in frontier if f["nfe"] <= 0.4 * 8 * T], key=lambda f: (-f["success"], f["nfe"]))
    for f in ok[: args.top]:
        lines.append("  " + json.dumps(f))
    path = Path(args.pool).with_name("sweep.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusers_ext.verilatent.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="record candidate pools on toy-world cases")
    c.add_argument("--model", default=None)
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--cases", type=int, default=96)
    c.add_argument("--pool", type=int, default=16)
    c.add_argument("--kmax", type=int, default=3)
    c.add_argument("--split", default="train", choices=("train", "heldout", "any"))
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default="runs/verilatent/calib")
    c.set_defaults(fn=collect)
    s = sub.add_parser("sweep", help="replay search policies on a recorded pool")
    s.add_argument("pool")
    s.add_argument("--top", type=int, default=12)
    s.add_argument("--full", action="store_true", help="the full grid (6x the settings, slow on CPU)")
    s.set_defaults(fn=sweep)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())

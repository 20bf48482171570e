"""``editsteer probe``: where does a frozen editor's error pattern emerge? (``methods.md`` §1.2 claim 2, §1.4)

For a set of edit pairs and the editor's own noise levels, every block's image-stream state is read out as a
velocity (the model's own ``norm_out`` + ``proj_out``, the "logit lens", or trained stage-1 probe heads); its
per-token error against the true velocity ``v* = noise - x0`` is log-normalised, and its Spearman rank correlation
with the final-layer error map (the model's actual output) is averaged over cases and noise levels. The paper
reports rho = 0.83 already in early layers of its backbone; the curve picks the critic's insertion layer ``l_in``.

Example::

    editsteer probe --cases 64 --out runs/probe                 # toy editor, logit lens
    editsteer probe --probes runs/critic/stage1/probes.safetensors --out runs/probe-trained

Writes ``probe.json`` (per-layer mean/std rho, per noise level) and ``probe.png`` (the curve).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "per-layer error maps of a frozen editor and their Spearman correlation with the final-layer map"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="toy editor: manifest id or pipeline folder (default: bundled)")
    p.add_argument("--cases", type=int, default=64, help="edit pairs (toy world)")
    p.add_argument("--split", default="heldout", choices=("train", "heldout", "any"))
    p.add_argument("--seed", type=int, default=0, help="selects the cases and the noise")
    p.add_argument("--probes", default=None,
                   help="trained probe heads (stage 1 of `editsteer train critic`); default: logit lens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.8, help="l_in = first block whose mean rho reaches this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/probe", help="output folder")


def run(args) -> int:
    import torch

    from ..errors import EditSteerConfigError
    from ..toy.editor import load_toy_editor
    from .data import KontextEditData
    from .module import ProbeHeads

    if args.cases < 1:
        raise EditSteerConfigError("--cases must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, where = load_toy_editor(args.model)
    data = KontextEditData.from_toy_world(pipe, args.cases, split=args.split, seed=args.seed)
    probes = ProbeHeads.load(args.probes) if args.probes else None
    res = probe_curve(pipe.transformer, data, probes=probes, batch_size=args.batch_size, seed=args.seed,
                      threshold=args.threshold)
    res.update({"model": where, "cases": args.cases, "split": args.split, "seed": args.seed,
                "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(res, indent=2) + "\n")
    plot_curves(out / "probe.png", {res["readout"]: res["rho_mean"]}, threshold=args.threshold,
                title=f"Spearman rho(layer error map, final error map), {args.cases} {args.split} cases")
    print(format_curve(res))
    print(f"wrote {out}/probe.json and {out}/probe.png")
    return 0


def probe_curve(transformer, data, probes=None, batch_size: int = 16, seed: int = 0, threshold: float = 0.8,
                sigma_indices=None) -> dict:
    """Per-block Spearman rho between each block's log-normalised error map and the final one.

    Every case is probed at every noise level of ``data.sigmas`` (or ``sigma_indices``) with noise from ``seed``.
    """
    import torch

    from . import core
    from .apply import describe_transformer
    from .taps import capture_blocks, logit_lens

    depth = describe_transformer(transformer)["depth"]
    sig_idx = list(range(len(data.sigmas))) if sigma_indices is None else list(sigma_indices)
    n_tgt = data.x0.shape[1]
    rhos = torch.zeros(len(sig_idx), depth, dtype=torch.float64)
    counts = torch.zeros(len(sig_idx), depth, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            batch = data.batch(idx)
            for j, si in enumerate(sig_idx):
                x_t, v_star, sigma = data.noised(batch, g, torch.full((len(idx),), si))
                with capture_blocks(transformer, n_tgt) as tap:
                    v_final = data.forward(transformer, batch, x_t, sigma)
                e_final = core.log_normalise(core.token_errors(v_final, v_star))
                for l in range(depth):
                    h = tap.hidden[l]
                    v_l = probes(l, h, tap.temb) if probes is not None else logit_lens(transformer, h, tap.temb)
                    e_l = core.log_normalise(core.token_errors(v_l, v_star))
                    r = core.spearman(e_l, e_final)
                    ok = ~torch.isnan(r)
                    rhos[j, l] += r[ok].sum()
                    counts[j, l] += ok.sum()
    per_sigma = (rhos / counts.clamp_min(1)).tolist()
    mean = (rhos.sum(0) / counts.sum(0).clamp_min(1))
    # spread over noise levels (each level averaged over cases)
    std = torch.tensor(per_sigma).std(0) if len(sig_idx) > 1 else torch.zeros(depth)
    l_in = next((l for l in range(depth) if mean[l] >= threshold), depth - 1)
    return {"readout": "probe heads" if probes is not None else "logit lens", "depth": depth,
            "rho_mean": [round(float(x), 4) for x in mean], "rho_std_over_sigmas": [round(float(x), 4) for x in std],
            "sigmas": [round(float(data.sigmas[i]), 4) for i in sig_idx],
            "rho_by_sigma": [[round(float(x), 4) for x in row] for row in per_sigma],
            "threshold": threshold, "suggested_l_in": int(l_in)}


def format_curve(res: dict) -> str:
    lines = [f"{res['readout']}: Spearman rho with the final-layer error map (mean over cases and noise levels)"]
    for l, (m, s) in enumerate(zip(res["rho_mean"], res["rho_std_over_sigmas"])):
        bar = "#" * max(0, int(round(30 * max(m, 0))))
        lines.append(f"  block {l:>2}: {m:+.3f} (+-{s:.3f}) {bar}")
    lines.append(f"  first block with rho >= {res['threshold']}: {res['suggested_l_in']}")
    return "\n".join(lines)


def plot_curves(path, curves: dict[str, list[float]], threshold: float | None = None, title: str = "") -> None:
    """A small line chart (PIL only): x = block, y = rho in [-0.2, 1]."""
    from PIL import Image, ImageDraw

    w, h, ml, mr, mt, mb = 640, 360, 50, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    n = max(len(c) for c in curves.values())
    lo, hi = -0.2, 1.0

    def xy(i, v):
        x = ml + (w - ml - mr) * (i / max(n - 1, 1))
        y = mt + (h - mt - mb) * (1 - (v - lo) / (hi - lo))
        return x, y

    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = xy(0, v)[1]
        d.line([(ml, y), (w - mr, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.1f}", fill="black")
    if threshold is not None:
        y = xy(0, threshold)[1]
        d.line([(ml, y), (w - mr, y)], fill=(240, 160, 160))
    for i in range(n):
        x = xy(i, lo)[0]
        d.text((x - 4, h - mb + 8), str(i), fill="black")
    colours = [(30, 90, 200), (220, 110, 20), (40, 160, 60), (150, 40, 160)]
    for k, (name, c) in enumerate(curves.items()):
        col = colours[k % len(colours)]
        pts = [xy(i, max(lo, min(hi, v))) for i, v in enumerate(c)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        d.text((ml + 10, mt + 5 + 14 * k), name, fill=col)
    d.text((ml, 8), title, fill="black")
    d.text((w // 2 - 20, h - 16), "block", fill="black")
    img.save(path)

"""Runs a :class:`~diffusers_ext.bench.base.BenchMethod` on held-out toy-world cases and writes the report.

Output folder layout::

    results.json          method, cases, seed, metrics, nfe_mean, wall_s, peak_mem_mb, per_case, settings
    grid.png              one row per case: source | target | output (| extra images)
    cases/<id>/           source.png, target.png, mask.png, output.png, extra pictures, case.json
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from .._version import __version__
from ..toy import metrics as M
from ..toy import world as W
from .base import BenchMethod


def command_line() -> str:
    """The command as a user would type it: ``editsteer bench ...`` for both the console script and
    ``python -m diffusers_ext`` (whose argv[0] is a machine-specific path to ``__main__.py``)."""
    prog = Path(sys.argv[0]).name
    head = ["editsteer"] if prog in ("editsteer", "__main__.py") else [sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def case_seed(seed: int, index: int) -> int:
    """The generator seed a method uses for case ``index`` of a run with ``--seed seed`` (same for every method)."""
    return seed * 100_003 + index


def peak_memory_mb() -> tuple[float, str]:
    """Peak memory: CUDA allocated when a GPU was used, else the process's peak resident set size."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    except Exception:  # pragma: no cover
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0, "process_peak_rss"


def _save_png(path: Path, img: np.ndarray) -> None:
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    W.to_pil(a).save(path)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a


def write_grid(path: Path, rows: list[list[np.ndarray]], scale: int = 4, pad: int = 2) -> None:
    """A picture of rows of equally sized images (upscaled with nearest neighbour), white separators."""
    if not rows:
        return
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    H = len(rows) * (h * scale + pad) + pad
    Wd = ncol * (w * scale + pad) + pad
    canvas = np.full((H, Wd, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            big = np.kron(_rgb(img), np.ones((scale, scale, 1), np.uint8))
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            canvas[y:y + big.shape[0], x:x + big.shape[1]] = big[: h * scale, : w * scale]
    W.to_pil(canvas).save(path)


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


def run(method: BenchMethod, *, cases: int, seed: int, out: str | Path, split: str = "heldout",
        families: tuple[str, ...] | None = None, turns: int = 12, progress: bool = True,
        command: str | None = None) -> dict:
    """Run ``method`` on ``cases`` cases of ``split`` and write the report to ``out``; return the results dict.
    ``command`` is recorded as the command that reproduces the run (default: this process's command line)."""
    out = Path(out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    multiturn = method.kind == "multiturn"
    fams = tuple(families) if families else (W.SEQUENCE_FAMILIES if multiturn else W.FAMILIES)
    per_case, per_seq, per_turn, grid_rows, turn_rows = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(cases):
        cs = case_seed(seed, i)
        if multiturn:
            seq = W.make_sequence(split, seed, i, turns=turns, families=fams)
            t_case = time.perf_counter()
            results = method.edit_sequence(seq, cs)
            dt = time.perf_counter() - t_case
            if len(results) != seq.turns:
                raise RuntimeError(f"{method.name} returned {len(results)} turns for a {seq.turns}-turn sequence")
            sm = M.sequence_metrics([r.image for r in results], seq)
            per_seq.append(sm)
            per_turn.extend(M.case_metrics(r.image, seq.images[t], seq.masks[t - 1], seq.images[t - 1])
                            for t, r in enumerate(results, start=1))
            entry = {**seq.to_json(), "nfe": int(sum(r.nfe for r in results)), "wall_s": dt, **sm,
                     "extras": [r.extras for r in results]}
            cid, src, tgt, mask, final = seq.id, seq.source, seq.images[-1], ~seq.untouched, results[-1]
            d = out / "cases" / cid
            d.mkdir(parents=True, exist_ok=True)
            for t, r in enumerate(results, start=1):
                _save_png(d / f"turn_{t:02d}.png", r.image)
                _save_png(d / f"target_{t:02d}.png", seq.images[t])
            turn_rows.append([src] + [r.image for r in results])
            turn_rows.append([src] + list(seq.images[1:]))
        else:
            case = W.make_case(split, seed, i, fams)
            t_case = time.perf_counter()
            final = method.edit(case, cs)
            dt = time.perf_counter() - t_case
            m = M.case_metrics(final.image, case.target, case.mask, case.source)
            entry = {**case.to_json(), "nfe": int(final.nfe), "wall_s": dt, **m, **final.extras}
            cid, src, tgt, mask = case.id, case.source, case.target, case.mask
            d = out / "cases" / cid
            d.mkdir(parents=True, exist_ok=True)
        per_case.append(entry)
        _save_png(d / "source.png", src)
        _save_png(d / "target.png", tgt)
        _save_png(d / "mask.png", mask)
        _save_png(d / "output.png", final.image)
        for name, img in final.images.items():
            _save_png(d / f"{name}.png", img)
        (d / "case.json").write_text(json.dumps(_clean(entry), indent=2) + "\n")
        grid_rows.append([src, tgt, final.image, *final.images.values()])
        if progress:
            print(f"[{method.name}] {i + 1}/{cases} {cid} nfe={entry['nfe']} {dt:.2f}s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    peak, peak_kind = peak_memory_mb()

    keys = ("edit_region_mse", "edit_region_psnr", "edit_accuracy", "edit_success", "background_mse",
            "background_psnr", "leakage", "psnr", "ssim")
    if multiturn:  # averages over every turn of every sequence, plus the by-turn curves
        metrics = {**M.aggregate([{k: t[k] for k in keys} for t in per_turn]), **M.aggregate_sequences(per_seq)}
    else:
        metrics = M.aggregate([{k: c[k] for k in keys} for c in per_case])
    nfe = [c["nfe"] for c in per_case]
    results = {
        "method": method.name,
        "kind": method.kind,
        "cases": cases,
        "seed": seed,
        "split": split,
        "families": list(fams),
        "turns": turns if multiturn else 1,
        "metrics": metrics,
        "nfe_mean": float(np.mean(nfe)) if nfe else 0.0,
        "wall_s": wall,
        "wall_s_per_case": wall / max(cases, 1),
        "peak_mem_mb": peak,
        "peak_mem_kind": peak_kind,
        "settings": method.settings(),
        "per_case": per_case,
        "editsteer_version": __version__,
        "command": command or command_line(),
        "platform": platform.platform(),
    }
    results = _clean(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_grid(out / "grid.png", grid_rows)
    if turn_rows:
        write_grid(out / "turns.png", turn_rows, scale=3)
    return results


def summary_lines(results: dict) -> list[str]:
    m = results["metrics"]
    keys = [k for k in ("edit_success_rate", "edit_region_mse", "edit_accuracy", "background_psnr", "leakage",
                        "psnr", "ssim", "drift_slope") if k in m]
    lines = [f"{results['method']}: {results['cases']} {results['split']} cases, seed {results['seed']}, "
             f"NFE {results['nfe_mean']:.1f}/case, {results['wall_s']:.1f}s, peak {results['peak_mem_mb']:.0f} MB"]
    lines += [f"  {k:<18} {m[k]:.4f}" if isinstance(m[k], float) else f"  {k:<18} {m[k]}" for k in keys]
    for k in ("drift_by_turn", "success_by_turn"):
        if k in m:
            lines.append(f"  {k:<18} " + " ".join(f"{v:.4f}" for v in m[k]))
    return lines

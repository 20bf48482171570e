"""``editsteer compare BASE METHOD``: a case-by-case comparison of two bench runs, with bootstrap intervals.

Two ``editsteer bench`` runs with the same ``--cases``, ``--seed`` and ``--split`` edit the same cases with the same
per-case seeds, so their difference is *paired*. This command reports, for every metric, both means, the difference
(``METHOD - BASE``), the relative change of the means (``METHOD / BASE - 1``) and 95 % bootstrap intervals of both,
resampling cases (the same resample for both runs).

An interval says how much of a difference is case-to-case luck: on the toy editor, one 48-case draw moves the
background PSNR difference of a method by about half a decibel. Decide how many cases you will compare *before*
looking, and report the interval with the number.

Example::

    editsteer bench base   --cases 480 --seed 0 --out runs/bench/base
    editsteer bench critic --cases 480 --seed 0 --out runs/bench/critic
    editsteer compare runs/bench/base runs/bench/critic --out runs/bench/critic-vs-base.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import EditSteerConfigError
from ..toy.bench import METRIC_KEYS as KEYS  # per-case metrics compared by default (those present in both runs)

HELP = "compare two bench runs case by case (paired differences with bootstrap intervals)"
DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`")


def load_results(path: str | Path) -> dict:
    """A bench ``results.json``, given the file or the run folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise EditSteerConfigError(f"no bench results at {path} (expected a results.json or a folder holding one)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EditSteerConfigError(f"{p} is not valid JSON: {e}") from None


def _values(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows])


def paired_comparison(base: dict, method: dict, *, keys: tuple[str, ...] = KEYS, n_boot: int = 5000,
                      seed: int = 0, level: float = 0.95, by_family: bool = False) -> dict:
    """Paired comparison of two single-turn bench results (``results.json`` dicts) on the same cases.

    For every key present in both runs' ``per_case`` rows: ``n`` (cases where both values are finite), the means
    ``base`` and ``method``, ``delta = method - base`` and ``rel = method / base - 1`` (of the means), and
    ``delta_ci`` / ``rel_ci``: percentile bootstrap intervals at ``level`` from ``n_boot`` resamples of the cases,
    drawn once and shared by every key. Deterministic for a given ``seed``.

    ``by_family``: also ``families[name]``, the same comparison on each edit family's cases alone (resampled within
    the family), to show where a difference comes from.
    """
    for name, res in (("base", base), ("method", method)):
        if res.get("kind", "single") != "single" or "per_case" not in res:
            raise EditSteerConfigError(f"{name}: compare takes single-turn bench results with per-case rows")
    rows_b, rows_m = base["per_case"], method["per_case"]
    ids_b, ids_m = [r.get("id") for r in rows_b], [r.get("id") for r in rows_m]
    if ids_b != ids_m:
        diff = next((i for i, (a, b) in enumerate(zip(ids_b, ids_m)) if a != b), min(len(ids_b), len(ids_m)))
        raise EditSteerConfigError(
            f"the two runs are not on the same cases ({len(ids_b)} vs {len(ids_m)} cases; first difference at "
            f"position {diff}): run both with the same --cases, --seed, --split and --families")
    if n_boot < 1:
        raise EditSteerConfigError("the number of bootstrap resamples (--boot) must be at least 1")
    if not 0 < level < 1:
        raise EditSteerConfigError("the interval level (--level) must be in (0, 1)")
    out = {"cases": len(ids_b), "split": base.get("split"), "seed": base.get("seed"), "n_boot": n_boot,
           "bootstrap_seed": seed, "level": level, "base_method": base.get("method"),
           "method": method.get("method"), "metrics": _paired_metrics(rows_b, rows_m, keys, n_boot, seed, level)}
    if by_family:
        families = list(dict.fromkeys(r.get("family") for r in rows_b))
        if None in families:
            raise EditSteerConfigError("--by-family needs per-case 'family' entries (single-turn toy bench runs)")
        out["families"] = {}
        for fam in families:
            sel = [i for i, r in enumerate(rows_b) if r["family"] == fam]
            out["families"][fam] = {"cases": len(sel), "metrics": _paired_metrics(
                [rows_b[i] for i in sel], [rows_m[i] for i in sel], keys, n_boot, seed, level)}
    return out


def _paired_metrics(rows_b: list[dict], rows_m: list[dict], keys, n_boot: int, seed: int, level: float) -> dict:
    n = len(rows_b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), dtype=int)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, dict] = {}
    for key in keys:
        if not any(key in r for r in rows_b) or not any(key in r for r in rows_m):
            continue
        b, m = _values(rows_b, key), _values(rows_m, key)
        ok = np.isfinite(b) & np.isfinite(m)
        if not ok.any():
            continue
        w = ok.astype(float)
        b0, m0 = np.where(ok, b, 0.0), np.where(ok, m, 0.0)
        # resampled means over the finite pairs of each resample
        cnt = w[idx].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            bb, mb = b0[idx].sum(1) / cnt, m0[idx].sum(1) / cnt
            d_boot, r_boot = mb - bb, mb / bb - 1
        bm, mm = float(b[ok].mean()), float(m[ok].mean())
        entry = {"n": int(ok.sum()), "base": bm, "method": mm, "delta": mm - bm,
                 "delta_ci": [float(np.nanpercentile(d_boot, lo_q)), float(np.nanpercentile(d_boot, hi_q))]}
        if bm != 0:
            entry["rel"] = mm / bm - 1
            finite = r_boot[np.isfinite(r_boot)]
            entry["rel_ci"] = ([float(np.percentile(finite, lo_q)), float(np.percentile(finite, hi_q))]
                               if finite.size else [math.nan, math.nan])
        out[key] = entry
    return out


def table(comparison: dict) -> str:
    """A Markdown table of :func:`paired_comparison`'s result."""
    pct = int(round(comparison["level"] * 100))
    names = comparison.get("inputs") or {"method": comparison["method"], "base": comparison["base_method"]}
    lines = [f"{names['method']} vs {names['base']}: {comparison['cases']} {comparison['split']} "
             f"cases, seed {comparison['seed']}; {pct} % bootstrap intervals ({comparison['n_boot']} resamples)",
             "", f"| metric | n | base | method | difference [{pct} %] | relative [{pct} %] |", "|---" * 6 + "|"]
    for key, e in comparison["metrics"].items():
        d = f"{e['delta']:+.4g} [{e['delta_ci'][0]:+.4g}, {e['delta_ci'][1]:+.4g}]"
        r = (f"{100 * e['rel']:+.1f} % [{100 * e['rel_ci'][0]:+.1f}, {100 * e['rel_ci'][1]:+.1f}]"
             if "rel" in e else "-")
        lines.append(f"| {key} | {e['n']} | {e['base']:.4g} | {e['method']:.4g} | {d} | {r} |")
    if comparison.get("families"):
        keys = list(comparison["metrics"])
        lines += ["", f"By edit family: difference [{pct} %]", "",
                  "| family | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for fam, f in comparison["families"].items():
            cells = [(f"{f['metrics'][k]['delta']:+.3g} [{f['metrics'][k]['delta_ci'][0]:+.3g}, "
                      f"{f['metrics'][k]['delta_ci'][1]:+.3g}]") if k in f["metrics"] else "-" for k in keys]
            lines.append(f"| {fam} | {f['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(path: str) -> str:
    """A run's name for the report: its folder (``runs/bench/critic/results.json`` -> ``runs/bench/critic``)."""
    p = Path(path)
    return str(p.parent if p.name == "results.json" else p)


def add_arguments(p) -> None:
    p.add_argument("base", help="the reference run: its folder or results.json (e.g. runs/bench/base)")
    p.add_argument("method", help="the run compared against it, on the same cases")
    p.add_argument("--boot", type=int, default=5000, help="bootstrap resamples (default 5000)")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--metrics", default=None, help=f"comma-separated per-case keys (default: {','.join(KEYS)})")
    p.add_argument("--by-family", action="store_true", help="also compare each edit family's cases on their own")
    p.add_argument("--out", default=None, help="also write the comparison as JSON to this file")


def run(args) -> int:
    keys = tuple(k.strip() for k in args.metrics.split(",") if k.strip()) if args.metrics else KEYS
    res = paired_comparison(load_results(args.base), load_results(args.method), keys=keys, n_boot=args.boot,
                            seed=args.boot_seed, level=args.level, by_family=args.by_family)
    res["inputs"] = {"base": _label(args.base), "method": _label(args.method)}
    res["command"] = getattr(args, "_command", None)
    print(table(res))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
    return 0

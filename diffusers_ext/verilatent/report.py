"""Quality-vs-NFE table and plot over ``editsteer bench`` runs (single, best-of-N, VeriLatent fixed/adaptive).

    python -m diffusers_ext.verilatent.report runs/verilatent            # every */results.json below the folder
    python -m diffusers_ext.verilatent.report runs/a runs/b --out report/

Writes ``quality_vs_nfe.json`` (the table, the difficulty buckets and the per-family NFE of every VeriLatent run,
the overhead), ``quality_vs_nfe.md`` (the same as Markdown) and ``quality_vs_nfe.png`` (edit success against mean
NFE per edit, one point per run). Runs must share cases and seed to be compared; the report says so when they do not.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def label(res: dict) -> str:
    s = res.get("settings", {})
    if res["method"] == "bon":
        n = s.get("n", 1)
        if n == 1:
            return "single"
        return f"BoN-{n}" + (" medoid" if s.get("verifier_kind") == "medoid" else "")
    if res["method"] == "verilatent":
        cfg = s.get("config", {})
        if s.get("mode") == "fixed":
            return f"VeriLatent fixed N={cfg.get('n0')} k={cfg.get('k')}"
        return f"VeriLatent adaptive {cfg.get('n0')}->{cfg.get('n_max')} k={cfg.get('k')}"
    return res["method"]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarise(results: list[dict]) -> dict:
    rows = []
    singles = {}
    for r in results:  # the single-sample reference: `bench base` or `bench bon --n 1` (the same images)
        if r["method"] == "base" or (r["method"] == "bon" and r.get("settings", {}).get("n", 1) == 1):
            singles = singles or {c["id"]: c for c in r["per_case"]}
    for r in results:
        m = r["metrics"]
        ov = r.get("settings", {}).get("overhead", {})
        rows.append({
            "method": label(r), "run": r.get("_path"), "cases": r["cases"], "seed": r["seed"], "split": r["split"],
            "edit_success_rate": m.get("edit_success_rate"), "edit_region_mse": m.get("edit_region_mse"),
            "background_psnr": m.get("background_psnr"), "nfe_mean": r["nfe_mean"], "wall_s": r["wall_s"],
            "wall_s_per_case": r["wall_s_per_case"], "non_model_frac": ov.get("non_model_frac"),
            "verify_frac": ov.get("verify_frac"), "command": r.get("command")})
    rows.sort(key=lambda x: x["nfe_mean"])
    out = {"table": rows, "buckets": {}, "families": {}}
    for r in results:
        if r["method"] != "verilatent":
            continue
        by_b, by_f = defaultdict(list), defaultdict(list)
        for c in r["per_case"]:
            by_b[c.get("bucket", "?")].append(c)
            by_f[c.get("family", "?")].append(c)

        def stats(cs):
            return {"cases": len(cs), "nfe_mean": _mean([c["nfe"] for c in cs]),
                    "candidates_mean": _mean([c.get("candidates") for c in cs]),
                    "edit_success_rate": _mean([c["edit_success"] for c in cs]),
                    "single_success_rate": _mean([singles[c["id"]]["edit_success"] for c in cs if c["id"] in singles])}

        order = [b for b in ("easy", "medium", "hard", "single") if b in by_b] + sorted(
            b for b in by_b if b not in ("easy", "medium", "hard", "single"))
        out["buckets"][label(r)] = {b: stats(by_b[b]) for b in order}
        out["families"][label(r)] = {f: stats(cs) for f, cs in sorted(by_f.items())}
    keys = {(r["cases"], r["seed"], r["split"]) for r in results}
    out["comparable"] = len(keys) == 1
    out["targets"] = targets(rows, out["buckets"])
    return out


def targets(rows: list[dict], buckets: dict) -> dict:
    """The issue's targets, checked on these runs: VeriLatent adaptive reaches best-of-8's edit success at <= 40 % of
    its NFE; its NFE per edit differs by difficulty bucket; verification overhead (all but model calls) < 2 % of wall.
    Best-of-8 is the pixel-score verifier run (``BoN-8``); the medoid variant is reported beside it."""
    by = {r["method"]: r for r in rows}
    bon8 = by.get("BoN-8")
    out = {}
    for name, r in by.items():
        if not name.startswith("VeriLatent adaptive"):
            continue
        t = {"edit_success": r["edit_success_rate"], "nfe_mean": r["nfe_mean"],
             "non_model_frac": r["non_model_frac"], "verify_frac": r["verify_frac"]}
        if bon8:
            t.update(bon8_success=bon8["edit_success_rate"], bon8_nfe=bon8["nfe_mean"],
                     nfe_frac_of_bon8=r["nfe_mean"] / bon8["nfe_mean"],
                     success_at_least_bon8=r["edit_success_rate"] >= bon8["edit_success_rate"],
                     nfe_at_most_40pct=r["nfe_mean"] <= 0.4 * bon8["nfe_mean"])
            t["met_success_and_nfe"] = t["success_at_least_bon8"] and t["nfe_at_most_40pct"]
        strongest = max((v for k, v in by.items() if k.startswith("BoN-8")), default=None,
                        key=lambda v: v["edit_success_rate"])
        if strongest and strongest is not bon8:  # e.g. the medoid verifier beat the pixel score
            t.update(strongest_bon8=strongest["method"], strongest_bon8_success=strongest["edit_success_rate"],
                     success_at_least_strongest_bon8=r["edit_success_rate"] >= strongest["edit_success_rate"])
        nfes = {b: s["nfe_mean"] for b, s in buckets.get(name, {}).items()}
        t["nfe_by_bucket"] = nfes
        t["nfe_differs_by_bucket"] = len(set(nfes.values())) > 1
        t["verify_under_2pct"] = r["verify_frac"] is not None and r["verify_frac"] < 0.02
        t["non_model_under_2pct"] = r["non_model_frac"] is not None and r["non_model_frac"] < 0.02
        single = by.get("single")
        if single and single["non_model_frac"] is not None and r["non_model_frac"] is not None:
            # the plain pipeline's own plumbing (scheduler, packing, image processing) is not verification
            t["single_non_model_frac"] = single["non_model_frac"]
            t["extra_non_model_vs_single"] = r["non_model_frac"] - single["non_model_frac"]
        out[name] = t
    return out


def _fmt(v, nd=3):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(summary: dict) -> str:
    lines = ["| method | edit success | edit-region MSE | background PSNR | NFE / edit | wall s / edit | "
             "outside model calls | verifier |", "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    for r in summary["table"]:
        lines.append(f"| {r['method']} | {_fmt(r['edit_success_rate'])} | {_fmt(r['edit_region_mse'], 4)} | "
                     f"{_fmt(r['background_psnr'], 1)} | {_fmt(r['nfe_mean'], 1)} | {_fmt(r['wall_s_per_case'], 3)} | "
                     f"{pct(r['non_model_frac'])} | {pct(r['verify_frac'])} |")
    for name, b in summary["buckets"].items():
        lines += ["", f"**{name}**: by difficulty bucket", "",
                  "| bucket | cases | NFE / edit | candidates | success (VeriLatent) | success (single sample) |",
                  "|---|---|---|---|---|---|"]
        for k, s in b.items():
            lines.append(f"| {k} | {s['cases']} | {_fmt(s['nfe_mean'], 1)} | {_fmt(s['candidates_mean'], 1)} | "
                         f"{_fmt(s['edit_success_rate'])} | {_fmt(s['single_success_rate'])} |")
        fam = summary["families"][name]
        lines += ["", f"**{name}**: by edit family (ground-truth family, for reporting only)", "",
                  "| family | cases | NFE / edit | candidates | success (VeriLatent) | success (single sample) |",
                  "|---|---|---|---|---|---|"]
        for k, s in fam.items():
            lines.append(f"| {k} | {s['cases']} | {_fmt(s['nfe_mean'], 1)} | {_fmt(s['candidates_mean'], 1)} | "
                         f"{_fmt(s['edit_success_rate'])} | {_fmt(s['single_success_rate'])} |")
    for name, t in summary.get("targets", {}).items():
        lines += ["", f"**{name}**: the issue's targets", ""]
        if "bon8_success" in t:
            lines.append(f"- success {_fmt(t['edit_success'])} vs BoN-8 {_fmt(t['bon8_success'])} "
                         f"({'met' if t['success_at_least_bon8'] else 'not met'}); NFE {_fmt(t['nfe_mean'], 1)} = "
                         f"{100 * t['nfe_frac_of_bon8']:.0f} % of BoN-8's {_fmt(t['bon8_nfe'], 1)} "
                         f"({'met' if t['nfe_at_most_40pct'] else 'not met'}: <= 40 %)")
        if "strongest_bon8" in t:
            lines.append(f"- against the stronger {t['strongest_bon8']} ({_fmt(t['strongest_bon8_success'])}): "
                         f"{'met' if t['success_at_least_strongest_bon8'] else 'not met'}")
        lines.append("- NFE by bucket: " + ", ".join(f"{b} {_fmt(v, 1)}" for b, v in t["nfe_by_bucket"].items())
                     + f" ({'differs' if t['nfe_differs_by_bucket'] else 'does not differ'})")
        lines.append("- verifier time (maps, region, score, policy, x0 and attention capture) "
                     f"{100 * (t['verify_frac'] or 0):.2f} % of wall ({'met' if t['verify_under_2pct'] else 'not met'}: < 2 %); all time outside model "
                     f"calls {100 * (t['non_model_frac'] or 0):.1f} % "
                     f"({'met' if t['non_model_under_2pct'] else 'not met'}: < 2 %)"
                     + (f", the plain pipeline's own {100 * t['single_non_model_frac']:.1f} %"
                        if "single_non_model_frac" in t else ""))
    if not summary["comparable"]:
        lines += ["", "Warning: the runs do not share cases/seed/split; they are not comparable case by case."]
    return "\n".join(lines) + "\n"


_COLOURS = {"single": "gray", "base": "gray", "BoN": "blue", "VeriLatent fixed": "orange",
            "VeriLatent adaptive": "red"}


def _panel(d, box, rows, key, title, xmax):
    """One scatter panel of ``key`` against mean NFE per edit inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 55, x1 - 10, y0 + 22, y1 - 40
    ys = [r[key] for r in rows]
    pad = max(0.1 * (max(ys) - min(ys)), 0.01)
    ymin, ymax = min(ys) - pad, max(ys) + pad
    if key == "edit_success_rate":
        ymin, ymax = max(0.0, ymin), min(1.0, ymax)

    def xy(x, y):
        return left + (right - left) * x / xmax, top + (bottom - top) * (1 - (y - ymin) / (ymax - ymin))

    d.text((x0 + 5, y0 + 4), title, fill="black")
    d.line([xy(0, ymin), xy(xmax, ymin)], fill="black")
    d.line([xy(0, ymin), xy(0, ymax)], fill="black")
    for t in np.linspace(0, xmax, 6):
        x, y = xy(t, ymin)
        d.line([(x, y), (x, y + 4)], fill="black")
        d.text((x - 8, y + 6), f"{t:.0f}", fill="black")
    for t in np.linspace(ymin, ymax, 5):
        x, y = xy(0, t)
        d.line([(x - 4, y), (x, y)], fill="black")
        d.text((x - 50, y - 6), f"{t:.3f}", fill="black")
    d.text(((left + right) // 2 - 50, y1 - 18), "mean NFE per edit", fill="black")
    bon = sorted([r for r in rows if r["method"].startswith(("single", "BoN")) and "medoid" not in r["method"]],
                 key=lambda r: r["nfe_mean"])
    if len(bon) > 1:
        d.line([xy(r["nfe_mean"], r[key]) for r in bon], fill="blue")
    for i, r in enumerate(rows):
        c = next((v for k, v in _COLOURS.items() if r["method"].startswith(k)), "black")
        x, y = xy(r["nfe_mean"], r[key])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        d.text((x + 6, y - 12 + (i % 3) * 8), r["method"].replace("VeriLatent", "VL"), fill=c)


def plot(summary: dict, path: Path, size=(1100, 440)) -> None:
    """Edit success and edit-region MSE against NFE per edit, one point per run (PIL only, no plotting library)."""
    from PIL import Image, ImageDraw

    rows = [r for r in summary["table"] if r["edit_success_rate"] is not None]
    img = Image.new("RGB", size, "white")
    if rows:
        d = ImageDraw.Draw(img)
        xmax = max(r["nfe_mean"] for r in rows) * 1.15 or 1.0
        half = size[0] // 2
        _panel(d, (0, 0, half, size[1]), rows, "edit_success_rate", "edit success rate (higher is better)", xmax)
        if all(r["edit_region_mse"] is not None for r in rows):
            _panel(d, (half, 0, size[0], size[1]), rows, "edit_region_mse", "edit-region MSE (lower is better)",
                   xmax)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusers_ext.verilatent.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="results.json files or folders holding them (searched recursively)")
    p.add_argument("--out", default=None, help="output folder (default: the first folder given)")
    args = p.parse_args(argv)
    files = []
    for r in args.runs:
        q = Path(r)
        files += [q] if q.is_file() else sorted(q.rglob("results.json"))
    if not files:
        p.error("no results.json found")
    results = []
    for f in files:
        res = json.loads(f.read_text())
        if res.get("method") in ("base", "bon", "verilatent"):
            res["_path"] = str(f.parent)
            results.append(res)
    summary = summarise(results)
    out = Path(args.out or (args.runs[0] if Path(args.runs[0]).is_dir() else Path(args.runs[0]).parent))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_vs_nfe.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (out / "quality_vs_nfe.md").write_text(md)
    plot(summary, out / "quality_vs_nfe.png")
    print(md)
    print(f"wrote {out}/quality_vs_nfe.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

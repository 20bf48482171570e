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
        return "single" if n == 1 else f"BoN-{n}"
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
    for r in results:
        if r["method"] == "bon" and r.get("settings", {}).get("n", 1) == 1:
            singles = {c["id"]: c for c in r["per_case"]}
    for r in results:
        m = r["metrics"]
        ov = r.get("settings", {}).get("overhead", {})
        rows.append({
            "method": label(r), "run": r.get("_path"), "cases": r["cases"], "seed": r["seed"], "split": r["split"],
            "edit_success_rate": m.get("edit_success_rate"), "edit_region_mse": m.get("edit_region_mse"),
            "background_psnr": m.get("background_psnr"), "nfe_mean": r["nfe_mean"], "wall_s": r["wall_s"],
            "wall_s_per_case": r["wall_s_per_case"], "non_model_frac": ov.get("non_model_frac"),
            "verify_frac": ov.get("verify_frac")})
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
    return out


def _fmt(v, nd=3):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown(summary: dict) -> str:
    lines = ["| method | edit success | edit-region MSE | background PSNR | NFE / edit | wall s / edit |",
             "|---|---|---|---|---|---|"]
    for r in summary["table"]:
        lines.append(f"| {r['method']} | {_fmt(r['edit_success_rate'])} | {_fmt(r['edit_region_mse'], 4)} | "
                     f"{_fmt(r['background_psnr'], 1)} | {_fmt(r['nfe_mean'], 1)} | {_fmt(r['wall_s_per_case'], 3)} |")
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
    if not summary["comparable"]:
        lines += ["", "Warning: the runs do not share cases/seed/split; they are not comparable case by case."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, size=(640, 420)) -> None:
    """Edit success against NFE per edit (PIL only: no plotting library is needed)."""
    from PIL import Image, ImageDraw

    rows = [r for r in summary["table"] if r["edit_success_rate"] is not None]
    W_, H_ = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 20, 50
    if not rows:
        img.save(path)
        return
    xmax = max(r["nfe_mean"] for r in rows) * 1.1 or 1.0
    ys = [r["edit_success_rate"] for r in rows]
    ymin, ymax = max(0.0, min(ys) - 0.1), min(1.0, max(ys) + 0.1)
    if ymax - ymin < 0.05:
        ymin, ymax = max(0.0, ymin - 0.05), min(1.0, ymax + 0.05)

    def xy(x, y):
        return (left + (W_ - left - right) * x / xmax, top + (H_ - top - bottom) * (1 - (y - ymin) / (ymax - ymin)))

    d.line([xy(0, ymin), xy(xmax, ymin)], fill="black")
    d.line([xy(0, ymin), xy(0, ymax)], fill="black")
    for t in np.linspace(0, xmax, 6):
        x, y = xy(t, ymin)
        d.line([(x, y), (x, y + 4)], fill="black")
        d.text((x - 10, y + 6), f"{t:.0f}", fill="black")
    for t in np.linspace(ymin, ymax, 5):
        x, y = xy(0, t)
        d.line([(x - 4, y), (x, y)], fill="black")
        d.text((x - 40, y - 6), f"{t:.2f}", fill="black")
    d.text((W_ // 2 - 60, H_ - 20), "mean NFE per edit", fill="black")
    d.text((5, 2), "edit success rate", fill="black")
    colours = {"single": "gray", "BoN": "blue", "VeriLatent fixed": "orange", "VeriLatent adaptive": "red"}
    bon = sorted([r for r in rows if r["method"].startswith(("BoN", "single"))], key=lambda r: r["nfe_mean"])
    if len(bon) > 1:
        d.line([xy(r["nfe_mean"], r["edit_success_rate"]) for r in bon], fill="blue")
    for i, r in enumerate(rows):
        c = next((v for k, v in colours.items() if r["method"].startswith(k)), "black")
        x, y = xy(r["nfe_mean"], r["edit_success_rate"])
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=c)
        d.text((x + 7, y - 6 + (i % 2) * 10), r["method"], fill=c)
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
        if res.get("method") in ("bon", "verilatent"):
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

"""Per-turn time and KV-cache memory of AnchorEdit on a full-width Wan transformer with random weights.

``python -m diffusers_ext.anchoredit.perf`` builds ``WanTransformer3DModel`` at Wan2.1-T2V-14B width (40 heads x 128,
FFN 13824, text 4096; ``--layers`` of its 40 blocks, random weights), runs ``--turns`` distilled turns (4 steps + the
cache write) against a sink + window cache and a full cache, and writes ``perf.json`` and ``perf.png`` (time and
cache memory per turn). Memory is exact (bytes held by the cache); time is wall clock on whatever device runs it.
It also reports the cache size the same run implies for the full 40-layer model at 1024x1024 (4096 tokens/frame).

Example (CPU, reduced depth)::

    python -m diffusers_ext.anchoredit.perf --layers 1 --size 128 --turns 12 --out runs/perf-14b-width
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .apply import anchoredit_forward, apply_anchoredit
from .config import AnchorEditConfig, SamplerConfig
from .sampling import sample_turn

WAN14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
              in_channels=16, out_channels=16, patch_size=(1, 2, 2), rope_max_seq_len=1024)


def build(layers: int, dtype, device, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        m = WanTransformer3DModel(num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  **WAN14B)
    m = m.to(dtype)
    for name, sub in m.named_modules():  # as from_pretrained(dtype=...) does: these stay in float32
        if any(k in name.split(".") for k in m._keep_in_fp32_modules):
            sub.float()
    return m.eval().requires_grad_(False)


@torch.no_grad()
def run_session(model, cfg: AnchorEditConfig, turns: int, size: int, text_len: int, dtype, device, seed=0):
    runtime = apply_anchoredit(model, cfg)
    try:
        lat = size // 8
        shape = (1, 16, 1, lat, lat)
        g = torch.Generator().manual_seed(seed)
        source = torch.randn(shape, generator=g).to(device, dtype)
        ctx = torch.randn(1, 1, text_len, 4096, generator=g).to(device, dtype)
        cache = runtime.new_cache()
        t0 = time.perf_counter()
        anchoredit_forward(model, source, torch.zeros(1, device=device), ctx, cache=cache, write=True)
        rows = [{"turn": 0, "time_s": time.perf_counter() - t0, "cache_bytes": cache.nbytes(),
                 "kept_frames": len(cache.frames)}]
        sampler = SamplerConfig.distilled()
        for turn in range(1, turns + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()

            def predict(x, t):
                return anchoredit_forward(model, x, torch.full((1,), float(t), device=device), ctx, cache=cache)

            x0 = sample_turn(predict, shape, sampler, torch.Generator().manual_seed(seed + 7919 * turn),
                             device=device, dtype=dtype)
            anchoredit_forward(model, x0, torch.zeros(1, device=device), ctx, cache=cache, write=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows.append({"turn": turn, "time_s": time.perf_counter() - t0, "cache_bytes": cache.nbytes(),
                         "kept_frames": len(cache.frames)})
        return rows, cache
    finally:
        from .apply import remove_anchoredit

        remove_anchoredit(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=1, help="blocks of the 40 (full width, reduced depth)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--text-len", type=int, default=512, help="instruction tokens (Wan: 512)")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/anchoredit-perf")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    model = build(a.layers, dtype, device)
    build_s = time.perf_counter() - t0
    params = sum(x.numel() for x in model.parameters())
    window_cfg = AnchorEditConfig(sink=a.sink, window=a.window, max_turns=a.turns)
    configs = {f"sink{a.sink}+window{a.window}": window_cfg,
               "full cache": AnchorEditConfig(window=None, max_turns=a.turns)}
    results = {}
    for name, cfg in configs.items():
        rows, cache = run_session(model, cfg, a.turns, a.size, a.text_len, dtype, device)
        results[name] = rows
        print(name, " ".join(f"{r['time_s']:.2f}s/{r['cache_bytes'] / 2**20:.1f}MiB" for r in rows), flush=True)
    tokens = (a.size // 16) ** 2
    per_frame = 2 * tokens * 40 * 128 * torch.finfo(dtype).bits // 8 * a.layers
    full_14b = 2 * 4096 * 40 * 128 * 2 * 40  # bytes per kept frame, 40 layers, bf16, 1024x1024
    report = {
        "model": "WanTransformer3DModel at Wan2.1-T2V-14B width, random weights", "layers": a.layers,
        "params": params, "dtype": a.dtype, "device": str(device), "size": a.size, "tokens_per_frame": tokens,
        "text_len": a.text_len, "turns": a.turns, "sampler": "distilled 4 steps + 1 cache write per turn",
        "build_s": build_s, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "cache_bytes_per_frame": per_frame, "results": results,
        # slots as cache.nbytes() counts them: the kept frames and the scratch slot (+ undo copies, apart)
        "derived_full_14b_1024px": {
            "cache_bytes_per_frame": full_14b,
            "window_cache_gib": full_14b * (a.sink + a.window + 1) / 2**30,
            "window_undo_copies_gib": full_14b * window_cfg.undo_depth / 2**30,
            "full_cache_gib_at_turn": {t: full_14b * (t + 2) / 2**30 for t in (5, 10, a.turns)},
        },
        "command": "python -m diffusers_ext.anchoredit.perf " + " ".join(argv if argv is not None else
                                                                         __import__("sys").argv[1:]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "perf.png")
    print(f"wrote {out}/perf.json and {out}/perf.png")
    return 0


def _plot(report: dict, path: Path) -> None:
    """Two small line charts (time, cache MiB per turn) drawn with PIL only."""
    from PIL import Image, ImageDraw

    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (2 * w, h), "white")
    d = ImageDraw.Draw(img)
    colours = [(200, 40, 40), (40, 80, 220)]
    for panel, key, label, scale in ((0, "time_s", "s per turn", 1.0), (1, "cache_bytes", "cache MiB", 2**-20)):
        x0 = panel * w
        series = {n: [r[key] * scale for r in rows[1:]] for n, rows in report["results"].items()}
        top = max(max(v) for v in series.values()) * 1.1 or 1.0
        n = max(len(v) for v in series.values())
        d.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline=(0, 0, 0))
        d.text((x0 + pad, 8), f"{label} (max {top / 1.1:.2f})", fill=(0, 0, 0))
        for c, (name, v) in zip(colours, series.items()):
            pts = [(x0 + pad + (w - pad - 10) * i / max(1, n - 1), h - pad - (h - 2 * pad) * y / top)
                   for i, y in enumerate(v)]
            d.line(pts, fill=c, width=2)
            d.text((x0 + pad + 5, pad + 5 + 12 * list(series).index(name)), name, fill=c)
        d.text((x0 + pad, h - pad + 5), f"turn 1 .. {n}", fill=(0, 0, 0))
    img.save(path)


if __name__ == "__main__":
    raise SystemExit(main())

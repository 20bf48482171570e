"""Speed of an MLN edit against a plain generation of the same model and resolution (writes JSON).

``python -m diffusers_ext.mln.speed --out runs/mln-speed [--full-size] [--repeats 3] [--threads 1]``
``python -m diffusers_ext.mln.speed --out runs/mln-speed-gpu --full-size-only --full-size-reso 512 1024
--full-size-variants paper fast --device cuda --dtype bf16 --full-size-repeats 3 --busy`` (full-size runs take their
repeats from ``--full-size-repeats``; ``--repeats`` is the toy's)

* ``toy``: the bundled toy Switti (32 px, 6 scales), median over toy cases: MLN edit (source -> target caption)
  vs a plain generation of the target caption with the same sampling settings (CFG with a negative prompt on every
  scale but the last, soft Gumbel, last-scale temperature). A second baseline, ``plain_cfg_all``, guides every
  scale, as the official ``SwittiPipeline.__call__`` does by default (``turn_off_cfg_start_si=10``: every scale of
  Switti 512); the ratios against both are reported.
* ``full_size_512`` (``--full-size``): the official Switti 512 architecture (depth 30, width 1920, 2.47 B
  parameters; VQ-VAE 109 M) with random weights and random prompt encodings (the CLIP encoders are left out: they
  cost the same in both), on ``--device`` in ``--dtype`` (default: CPU, fp32).
* ``full_size_1024`` (``--full-size --full-size-reso 1024``): the same at 1024 px (14 scales), against plain
  generation and the Switti README's 1024 example (``turn_off_cfg_start_si=11``); every-scale CFG is left out and
  only MLN's ``1024`` preset runs by default, to keep the run shorter (44 min on one CPU thread).
  ``--full-size-variants`` picks the MLN configurations timed at full size: ``paper`` (the preset) and / or
  ``fast`` (:meth:`MLNConfig.fast`); default ``paper fast`` at 512, ``paper`` at 1024.

Both report wall time, transformer row-passes x tokens (the work the transformer does), and MLN's parts (source
tokenisation, mask passes, scale loop, refinement + decode). On CUDA every timed call is synchronised and preceded by
one untimed warm-up call, the peak allocated memory is recorded, and the CPU-time ratios (meant for a shared CPU)
mean nothing; read the wall-time ``ratio``. ``--busy`` profiles one more call of each and adds the time the device
was busy (GPU kernels, or CPU ops) and its ratio: at batch 1 on a GPU the wall time is mostly Python and kernel
launches, and ``busy_ratio`` is what the wall ratio tends to once that overhead is gone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..bench.timing import busy_s, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def token_rows_plain(pns, cfg_stop) -> int:
    return sum((2 if k < cfg_stop else 1) * p * p for k, p in enumerate(pns))


def token_rows_mln(pns, cfg) -> int:
    K = len(pns)
    m = cfg.mask_scale if cfg.mask_scale is not None else K - 1
    mask = 0 if cfg.global_edit else 2 * pns[m] ** 2
    loop = 0
    tv_stop = K if cfg.tv_stop is None else cfg.tv_stop
    for k in range(cfg.copy_scales, K):
        nudge = cfg.tv_adaptive and k < tv_stop and (cfg.beta or cfg.alphas[k])
        loop += (2 if (cfg.cfg_start <= k < cfg.cfg_stop or nudge) else 1) * pns[k] ** 2
    return mask + loop


def _time(fn, repeats: int, device: torch.device = torch.device("cpu")
          ) -> tuple[float, list[float], object, float]:
    """Median wall time, all wall times, the last output, and the median CPU time of this process (which, unlike
    wall time, does not grow when other jobs share the cores). On CUDA: one untimed warm-up call, and the device
    synchronised around every timed call."""
    if device.type == "cuda":
        fn()
    ts, cpu, out = [], [], None
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(ts), ts, out, statistics.median(cpu)


def bench_pipeline(pipe, cases: list[tuple], configs: list, repeats: int, encodings=None,
                   baselines: dict[str, int] | None = None, busy: bool = False) -> dict:
    """Median wall times over ``cases`` = [(image, source, target), ...]: plain generations with the first config's
    sampling settings, and MLN with each config.

    ``baselines`` maps a name to the plain generation's ``turn_off_cfg_start_si``; ``"plain"`` (guidance off at the
    config's ``cfg_stop``, as MLN) is the reference of ``ratio``; every other baseline ``b`` gets ``b_s``,
    ``b_cpu_s``, ``token_rows_b`` and a ``vs_b`` block per MLN config. Default: ``plain`` and ``plain_cfg_all``
    (every scale guided, the official ``SwittiPipeline.__call__`` default at 512 px).

    ``busy``: also profile one more call of each (:func:`busy_s`) and report the median busy time, ``busy_s`` and
    ``busy_ratio`` (MLN over plain).
    """
    from ..switti.pipeline import SwittiPipeline
    from .pipeline import MLNPipeline

    plain = SwittiPipeline(**pipe.components)
    mln = MLNPipeline(**pipe.components)
    for p in (plain, mln):
        p.set_progress_bar_config(disable=True)
    c0 = configs[0]
    pns = pipe.patch_nums
    device = pipe.transformer.device
    baselines = dict(baselines or {"plain": c0.cfg_stop, "plain_cfg_all": len(pns)})
    if "plain" not in baselines:
        raise ValueError("baselines must include 'plain' (the reference of the ratios)")
    kw = dict(guidance_scale=c0.cfg, top_k=c0.top_k, top_p=c0.top_p, smooth_start_si=c0.smooth_start,
              last_scale_temp=c0.last_temp, reseed_every_scale=True, output_type="pt")
    base_t: dict[str, list] = {b: [] for b in baselines}
    base_cpu: dict[str, list] = {b: [] for b in baselines}
    mln_t: dict[str, list] = {c.name: [] for c in configs}
    mln_cpu: dict[str, list] = {c.name: [] for c in configs}
    parts: dict[str, list] = {c.name: [] for c in configs}
    busy_t: dict[str, list] = {k: [] for k in [*baselines, *(c.name for c in configs)]}
    for i, (img, src, tgt) in enumerate(cases):
        enc = encodings(i) if encodings else {}
        p_kw = {"prompt_encoding": enc["target"], "negative_prompt_encoding": enc["source"]} if enc else {}
        m_kw = {"target_encoding": enc["target"], "source_encoding": enc["source"]} if enc else {}
        for b, stop in baselines.items():
            def run_plain():
                return plain(tgt, negative_prompt=src, seed=i, turn_off_cfg_start_si=stop, **kw, **p_kw)

            t, _, _, cpu = _time(run_plain, repeats, device)
            base_t[b].append(t)
            base_cpu[b].append(cpu)
            if busy:
                busy_t[b].append(busy_s(run_plain, device))
        for c in configs:
            def run_mln():
                return mln(img, src, tgt, config=c, seed=i, output_type="pt", **m_kw)

            t, _, out, cpu = _time(run_mln, repeats, device)
            mln_t[c.name].append(t)
            mln_cpu[c.name].append(cpu)
            parts[c.name].append({k: out.info[k] for k in ("mask_s", "sample_s", "total_s")})
            if busy:
                busy_t[c.name].append(busy_s(run_mln, device))
    med = {b: statistics.median(v) for b, v in base_t.items()}
    cpu = {b: statistics.median(v) for b, v in base_cpu.items()}
    rows = {b: token_rows_plain(pns, stop) for b, stop in baselines.items()}
    res = {"plain_s": med["plain"], "plain_s_all": base_t["plain"], "plain_cpu_s": cpu["plain"],
           "token_rows_plain": rows["plain"], "cases": len(cases), "repeats": repeats, "patch_nums": list(pns),
           "baselines_turn_off_cfg_start_si": baselines, "device": str(device),
           "dtype": str(pipe.transformer.dtype).removeprefix("torch."), "mln": {}}
    med_busy = {k: statistics.median(v) for k, v in busy_t.items() if v}
    if busy:
        res["plain_busy_s"] = med_busy["plain"]
    if device.type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(device)
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    others = [b for b in baselines if b != "plain"]
    for b in others:
        res.update({f"{b}_s": med[b], f"{b}_cpu_s": cpu[b], f"token_rows_{b}": rows[b]})
        if busy:
            res[f"{b}_busy_s"] = med_busy[b]
    for c in configs:
        med_m = statistics.median(mln_t[c.name])
        cpu_m = statistics.median(mln_cpu[c.name])
        rows_m = token_rows_mln(pns, c)
        res["mln"][c.name] = {
            "mln_s": med_m, "ratio": med_m / med["plain"], "mln_s_all": mln_t[c.name],
            "mln_cpu_s": cpu_m, "cpu_ratio": cpu_m / cpu["plain"],
            "parts_median_s": {k: statistics.median(p[k] for p in parts[c.name]) for k in parts[c.name][0]},
            "token_rows": rows_m, "token_row_ratio": rows_m / rows["plain"],
            **{f"vs_{b}": {"ratio": med_m / med[b], "cpu_ratio": cpu_m / cpu[b], "token_row_ratio": rows_m / rows[b]}
               for b in others},
        }
        if busy:
            res["mln"][c.name].update(busy_s=med_busy[c.name], busy_ratio=med_busy[c.name] / med_busy["plain"])
    return res


def toy(args) -> dict:
    from ..toy import world as W
    from .bench import load_pipeline
    from .config import MLNConfig
    from .pipeline import MLNPipeline

    pipe, where = load_pipeline(args.model, MLNPipeline)
    pipe.to(args.device, DTYPES[args.dtype])
    cfg = MLNConfig.for_num_scales(len(pipe.patch_nums))
    cases = [W.make_case("heldout", 0, i) for i in range(args.toy_cases)]
    res = bench_pipeline(pipe, [(W.to_pil(c.source), c.source_caption, c.target_caption) for c in cases],
                         [cfg, cfg.fast()], args.repeats, busy=args.busy)
    res["model"] = where
    return res


def full_size_configs(reso: int, variants=None) -> list:
    """The MLN configurations timed at full size: ``paper`` (the preset) and / or ``fast``; default ``paper fast``
    at 512, ``paper`` at 1024."""
    from .config import MLNConfig

    cfg = MLNConfig.preset(str(reso))
    variants = variants or (["paper", "fast"] if reso == 512 else ["paper"])
    return [{"paper": cfg, "fast": cfg.fast()}[v] for v in variants]


def full_size(args, reso: int = 512) -> dict:
    from ..switti import SwittiTransformer, SwittiVQVAE
    from ..switti.loading import transformer_config_from_official, vqvae_config_from_official
    from ..switti.text import PromptEncoding
    from .pipeline import MLNPipeline

    torch.manual_seed(0)
    t0 = time.perf_counter()
    transformer = SwittiTransformer(**transformer_config_from_official({"depth": 30, "reso": reso})).eval()
    vqvae = SwittiVQVAE(**vqvae_config_from_official({}, reso=reso)).eval()
    transformer.to(args.device, DTYPES[args.dtype])
    vqvae.to(args.device, DTYPES[args.dtype])
    build_s = time.perf_counter() - t0
    pipe = MLNPipeline(transformer=transformer, vqvae=vqvae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                       tokenizer_2=None)
    T = 77
    g = torch.Generator().manual_seed(1)

    def enc(n_tokens: int) -> PromptEncoding:
        ids = torch.full((1, T), 49407)
        ids[0, 0] = 49406
        ids[0, 1:n_tokens - 1] = torch.arange(100, 98 + n_tokens)
        mask = torch.zeros(1, T, dtype=torch.long)
        mask[0, :n_tokens] = 1
        bias = torch.zeros(1, T).masked_fill(mask == 0, float("-inf"))
        return PromptEncoding(embeds=torch.randn(1, T, 2048, generator=g), pooled=torch.randn(1, 1280, generator=g),
                              bias=bias, input_ids=ids, attention_mask=mask)

    src, tgt = enc(12), enc(12)
    tgt.input_ids[0, 4] = 999  # one changed word
    img = torch.rand(3, reso, reso, generator=g)
    configs = full_size_configs(reso, args.full_size_variants)
    # the Switti README's 1024 example turns guidance off from scale 11
    baselines = None if reso == 512 else {"plain": configs[0].cfg_stop, "switti_readme_1024": 11}
    res = bench_pipeline(pipe, [(img, "source", "target")], configs, args.repeats,
                         encodings=lambda i: {"source": src, "target": tgt}, baselines=baselines, busy=args.busy)
    res.update(build_s=build_s, params_transformer=sum(p.numel() for p in transformer.parameters()),
               params_vqvae=sum(p.numel() for p in vqvae.parameters()),
               text_encoders="left out (random encodings; equal cost in both)")
    return res


def _say(name: str, r: dict) -> None:
    others = [b for b in r["baselines_turn_off_cfg_start_si"] if b != "plain"]
    parts = ", ".join(f"MLN[{k}] {v['mln_s']:.3f}s ({v['ratio']:.2f}x wall, {v['cpu_ratio']:.2f}x CPU, token-rows "
                      f"{v['token_row_ratio']:.2f}x"
                      + "".join(f"; against {b} {v['vs_' + b]['cpu_ratio']:.2f}x CPU" for b in others)
                      + (f"; busy {v['busy_ratio']:.2f}x" if "busy_ratio" in v else "") + ")"
                      for k, v in r["mln"].items())
    base = "".join(f", {b} {r[b + '_s']:.3f}s ({r[b + '_cpu_s']:.3f}s CPU)" for b in others)
    print(f"{name}: plain {r['plain_s']:.3f}s ({r['plain_cpu_s']:.3f}s CPU){base}; {parts}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusers_ext.mln.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mln-speed")
    p.add_argument("--model", default=None, help="toy model id or folder (default: the bundled toy-switti)")
    p.add_argument("--toy-cases", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per toy case (full size: --full-size-repeats)")
    p.add_argument("--full-size", action="store_true", help="also the 2.47 B-parameter Switti (random weights)")
    p.add_argument("--full-size-reso", type=int, nargs="+", choices=(512, 1024), default=[512],
                   help="full-size resolutions to time (default 512)")
    p.add_argument("--full-size-variants", nargs="+", choices=("paper", "fast"), default=None,
                   help="MLN configurations timed at full size (default: paper fast at 512, paper at 1024)")
    p.add_argument("--full-size-only", action="store_true")
    p.add_argument("--full-size-repeats", type=int, default=1, help="timed runs at full size (default 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="cpu", help="where the models run: cpu (default) or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model dtype (default fp32)")
    p.add_argument("--busy", action="store_true",
                   help="also profile one call of each and record the device's busy time (GPU kernels, CPU ops)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)


def _run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "speed.json"
    results = json.loads(f.read_text()) if f.exists() else {}
    results.update({"command": " ".join(["python -m diffusers_ext.mln.speed", *sys.argv[1:]]),
                    "platform": platform.platform(), "threads": args.threads, "device": args.device,
                    "dtype": args.dtype})
    if not args.full_size_only:
        results["toy"] = toy(args)
        _say("toy", results["toy"])
        f.write_text(json.dumps(results, indent=1) + "\n")
    if args.full_size or args.full_size_only:
        args.repeats = args.full_size_repeats
        for reso in args.full_size_reso:
            results[f"full_size_{reso}"] = full_size(args, reso)
            _say(f"full size {reso}", results[f"full_size_{reso}"])
            f.write_text(json.dumps(results, indent=1) + "\n")
    f.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

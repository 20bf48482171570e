"""What the Inline Critic costs: transformer forward time and peak memory with and without it.

Configurations: the toy editor, and a few blocks of full-width FLUX.1 Kontext (width 3072, 24 heads of 128, T5 4096
/ CLIP 768 context, guidance embedding; 19 double + 38 single blocks cut to ``--flux-blocks``) and Qwen-Image
(width 3072, 24 heads, Qwen2.5-VL 3584 context; 60 blocks cut to ``--qwen-blocks``), random weights, at 512x512 and
1024x1024 (Kontext: target + reference tokens; Qwen-Image-Edit likewise). For each: the bare transformer, the critic
installed in ``off``, ``critique`` and ``steer`` modes (``l_in = 0``, so every block pays: the worst case),
interleaved repeats, median times. Peak memory is the CUDA peak on a GPU, else the process's peak resident set
reset before each forward (Linux ``/proc/self/clear_refs``). Machine-independent numbers for the *whole* full-size
architectures come from the meta device: exact FLOPs (``torch.utils.flop_counter``) and exact peak tensor memory
(weights + activations in bf16, ``MemTracker``, attention modelled as a flash-type kernel).

Example::

    python -m diffusers_ext.critic.cost --out runs/critic-cost               # CPU, float32, about 10 minutes
    python -m diffusers_ext.critic.cost --only toy --repeats 5              # quick
    python -m diffusers_ext.critic.cost --device cuda --dtype bf16          # on a GPU

Writes ``cost.json`` (and prints a table). Target (issue 4): under 3 % extra time at 1024x1024.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

MODES = ("bare", "off", "critique", "steer")


def _peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def flux_full_width(blocks_double: int, blocks_single: int, dtype=None, device=None):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=blocks_double,
                                  num_single_layers=blocks_single, attention_head_dim=128, num_attention_heads=24,
                                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56)).to(device=device, dtype=dtype).eval()
    # (device/dtype None: keep the current default device, e.g. meta for FLOP counting)


def qwen_full_width(blocks: int, dtype=None, device=None):
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=blocks,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                       axes_dims_rope=(16, 56, 56)).to(device=device, dtype=dtype).eval()
    # (device/dtype None: keep the current default device, e.g. meta for FLOP counting)


def flux_inputs(t, side_px: int, text_len: int, batch: int, dtype, device, vae_factor: int = 8):
    """Kontext-style inputs: target + reference tokens (ids axis 0 = 0 / 1), T5 text, pooled CLIP, guidance."""
    import torch

    g = side_px // vae_factor // 2
    n = g * g
    ids = torch.zeros(g, g, 3)
    ids[..., 1] = torch.arange(g)[:, None]
    ids[..., 2] = torch.arange(g)[None, :]
    ids = ids.reshape(n, 3)
    ref = ids.clone()
    ref[:, 0] = 1
    c = t.config
    gen = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(batch, 2 * n, c.in_channels, generator=gen),
          "encoder_hidden_states": torch.randn(batch, text_len, c.joint_attention_dim, generator=gen),
          "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=gen),
          "timestep": torch.full((batch,), 0.5), "img_ids": torch.cat([ids, ref]), "txt_ids": torch.zeros(text_len, 3),
          "guidance": torch.full((batch,), 2.5) if c.guidance_embeds else None, "return_dict": False}
    kw = {k: v.to(device=device, dtype=dtype) if torch.is_tensor(v) else v for k, v in kw.items()}
    return kw, {"target_tokens": n, "reference_tokens": n, "text_tokens": text_len}


def qwen_inputs(t, side_px: int, text_len: int, batch: int, dtype, device, vae_factor: int = 8):
    import torch

    g = side_px // vae_factor // 2
    n = g * g
    c = t.config
    gen = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(batch, 2 * n, c.in_channels, generator=gen).to(device, dtype),
          "encoder_hidden_states": torch.randn(batch, text_len, c.joint_attention_dim, generator=gen).to(device, dtype),
          "encoder_hidden_states_mask": torch.ones(batch, text_len, dtype=torch.long, device=device),
          "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
          "img_shapes": [[(1, g, g), (1, g, g)]] * batch, "return_dict": False}
    return kw, {"target_tokens": n, "reference_tokens": n, "text_tokens": text_len}


def measure(transformer, inputs: dict, critic_kwargs: dict, repeats: int, device: str, modes=MODES,
            warmup: bool = True, busy: bool = False) -> dict:
    """Median forward time and peak memory per mode; modes interleaved within each repeat. ``busy``: also one
    profiled forward per mode, for the time the device was busy (GPU kernels, or CPU ops; see
    :func:`diffusers_ext.bench.timing.busy_s`) and its overhead over the bare forward."""
    import torch

    from ..bench.timing import busy_s, sync
    from .apply import apply_inline_critic, critic_config_for, remove_inline_critic
    from .module import InlineCritic

    torch.manual_seed(0)
    critic = InlineCritic(critic_config_for(transformer, **critic_kwargs))
    cuda = device.startswith("cuda")
    times = {m: [] for m in modes}
    peaks = {m: [] for m in modes}
    handle = None

    def use(m):  # the transformer as mode m runs it: bare (no critic) or with the critic in mode m
        nonlocal handle
        if m == "bare":
            if handle is not None:
                remove_inline_critic(transformer)
                handle = None
        else:
            if handle is None:
                handle = apply_inline_critic(transformer, critic, mode=m)
            handle.set_mode(m)

    with torch.no_grad():
        if warmup:
            transformer(**inputs)  # warm-up (allocator, kernels)
        for r in range(repeats):
            for m in modes:
                use(m)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                else:
                    _peak_reset()
                    base = _rss_kb("VmRSS:")
                sync(device)
                t0 = time.perf_counter()
                transformer(**inputs)
                sync(device)
                times[m].append(time.perf_counter() - t0)
                if cuda:
                    peaks[m].append((torch.cuda.max_memory_allocated() - base) / 2**20)
                else:
                    peaks[m].append((_rss_kb("VmHWM:") - base) / 1024)
        busy_t = {}
        for m in modes if busy else ():
            use(m)
            busy_t[m] = busy_s(lambda: transformer(**inputs), device)
    if handle is not None:
        remove_inline_critic(transformer)
    med = {m: statistics.median(v) for m, v in times.items()}
    res = {"time_s_median": {m: round(v, 5) for m, v in med.items()},
           "time_s_all": {m: [round(x, 5) for x in v] for m, v in times.items()},
           "peak_extra_mb_median": {m: round(statistics.median(v), 1) for m, v in peaks.items()},
           "critic_params": sum(p.numel() for p in critic.parameters())}
    res["overhead_pct_vs_bare"] = {m: round(100 * (med[m] / med["bare"] - 1), 2) for m in modes if m != "bare"}
    if busy_t:
        res["busy_s"] = {m: round(v, 5) for m, v in busy_t.items()}
        res["busy_overhead_pct_vs_bare"] = {m: round(100 * (busy_t[m] / busy_t["bare"] - 1), 2)
                                            for m in modes if m != "bare"}
    bare = times["bare"]
    res["bare_spread_pct"] = round(100 * (max(bare) - min(bare)) / med["bare"], 2) if len(bare) > 1 else None
    return res


def count_flops(build, make_inputs, critic_kwargs: dict) -> dict:
    """Exact FLOPs (``torch.utils.flop_counter``: matmuls and attention) of one forward per mode, on the meta
    device: the whole architecture at full size, no memory, no compute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .apply import apply_inline_critic, critic_config_for, remove_inline_critic
    from .module import InlineCritic

    with torch.device("meta"):
        t = build()
        critic = InlineCritic(critic_config_for(t, **critic_kwargs))
    inputs = make_inputs(t)
    flops = {}
    with torch.no_grad():
        for m in ("bare", "critique", "steer"):
            handle = None if m == "bare" else apply_inline_critic(t, critic, mode=m)
            with FlopCounterMode(display=False) as fc:
                t(**inputs)
            flops[m] = int(fc.get_total_flops())
            if handle is not None:
                remove_inline_critic(t)
    return {"tflops": {m: round(v / 1e12, 4) for m, v in flops.items()},
            "overhead_pct": {m: round(100 * (flops[m] / flops["bare"] - 1), 4) for m in ("critique", "steer")},
            "critic_params": sum(p.numel() for p in critic.parameters()),
            "blocks": critic.config.depth}


def count_memory(build, make_inputs, critic_kwargs: dict, dtype) -> dict:
    """Exact peak tensor memory (weights + activations, ``torch.distributed._tools.mem_tracker.MemTracker``) of one
    inference forward per mode, on the meta device at full size. Attention is modelled as a memory-efficient
    (flash-type) kernel that allocates only its output: on meta, torch would otherwise decompose it into the math
    kernel and materialise the full score matrix."""
    import torch
    import torch.nn.functional as F
    from torch.distributed._tools.mem_tracker import MemTracker

    from .apply import apply_inline_critic, critic_config_for, remove_inline_critic
    from .module import InlineCritic

    def flash_like(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)

    with torch.device("meta"):
        t = build().to(dtype)
        critic = InlineCritic(critic_config_for(t, **critic_kwargs))
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in make_inputs(t).items()}
    peaks = {}
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_like
    try:
        with torch.no_grad():
            for m in ("bare", "critique", "steer"):
                handle = None if m == "bare" else apply_inline_critic(t, critic, mode=m)
                mt = MemTracker()
                mt.track_external(t, critic)
                with mt:
                    t(**inputs)
                peaks[m] = sum(v.get("Total", 0) for v in mt.get_tracker_snapshot("peak").values())
                if handle is not None:
                    remove_inline_critic(t)
    finally:
        F.scaled_dot_product_attention = original
    weights = sum(p.numel() * p.element_size() for p in t.parameters())
    return {"peak_mb": {m: round(v / 2**20, 1) for m, v in peaks.items()},
            "weights_mb": round(weights / 2**20, 1),
            "extra_mb": {m: round((peaks[m] - peaks["bare"]) / 2**20, 1) for m in ("critique", "steer")},
            "extra_pct_of_activations": {m: round(100 * (peaks[m] - peaks["bare"]) / max(peaks["bare"] - weights, 1), 3)
                                         for m in ("critique", "steer")}}


def analytic_overhead(width: int, tokens: int, n_c: int = 1) -> float:
    """Extra work of ``n_c`` critic rows relative to a block over ``tokens`` rows: linear layers scale with rows
    (``n_c / tokens``), joint attention gains ``n_c`` keys per query (``~ n_c / tokens``), read mode adds ``n_c``
    queries; in percent."""
    return round(100 * 2 * n_c / tokens, 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusers_ext.critic.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/critic-cost")
    p.add_argument("--only", default="toy,flops,flux,qwen",
                   help="comma-separated subset of toy,flops,memory,flux,qwen (memory: exact bf16 peak of the whole "
                        "architectures on the meta device, slow: about 4 minutes per size and model on 1 core)")
    p.add_argument("--sizes", default="512,1024", help="image sides in pixels for the full-width models")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per mode at 1024 (2x at 512, 20x toy)")
    p.add_argument("--flux-blocks", default="0,1", help="double,single blocks of the timed full-width Flux")
    p.add_argument("--qwen-blocks", type=int, default=1, help="blocks of the timed full-width Qwen-Image")
    p.add_argument("--flux-text", type=int, default=512, help="T5 tokens (FLUX.1 Kontext default 512)")
    p.add_argument("--qwen-text", type=int, default=256, help="prompt tokens for Qwen-Image")
    p.add_argument("--adapter-rank", type=int, default=4)
    p.add_argument("--steer-rank", type=int, default=0, help="rank of the steering adapters (0: none)")
    p.add_argument("--n-tokens", type=int, default=1, help="critic tokens n_c (the bundled toy-critic has 4)")
    p.add_argument("--model", default=None, help="toy editor (default: bundled)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--busy", action="store_true",
                   help="also profile one forward per mode: the device's busy time (GPU kernels, or CPU ops)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    only = {s.strip() for s in args.only.split(",")}
    crit = {"n_tokens": args.n_tokens, "l_in": 0, "adapter_rank": args.adapter_rank, "steer_rank": args.steer_rank}
    results = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "critic": {**crit, "l_c": "l_in + depth/3", "note": "l_in = 0: every block carries the critic"},
               "peak_memory": "cuda max_allocated minus allocated before the call" if args.device.startswith("cuda")
               else "process peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call",
               "flops": [], "configs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]

    def save():
        (out / "cost.json").write_text(json.dumps(results, indent=2) + "\n")

    def record(name, t, inputs, info, repeats, modes, warmup, critic_kwargs=crit):
        t0 = time.perf_counter()
        r = measure(t, inputs, critic_kwargs, repeats, args.device, modes, warmup, busy=args.busy)
        tokens = info["target_tokens"] + info["reference_tokens"] + info["text_tokens"]
        entry = {"name": name, **info, "tokens": tokens, "repeats": repeats, "critic_kwargs": critic_kwargs,
                 "analytic_overhead_pct": analytic_overhead(t.inner_dim, tokens), **r,
                 "wall_s": round(time.perf_counter() - t0, 1)}
        results["configs"].append(entry)
        o = entry["overhead_pct_vs_bare"]
        print(f"{name:<44} bare {r['time_s_median']['bare']:.4f}s  " + "  ".join(f"{m} {v:+.2f}%" for m, v in
              o.items()) + f"  (peak extra MB bare/steer: {r['peak_extra_mb_median']['bare']:.0f}/"
              f"{r['peak_extra_mb_median']['steer']:.0f})"
              + ("".join(f"  busy {m} {v:+.2f}%" for m, v in r["busy_overhead_pct_vs_bare"].items())
                 if "busy_s" in r else ""), flush=True)
        save()

    if "flops" in only or "memory" in only:
        for side in sizes:
            for name, build, make in (
                    ("FLUX.1 Kontext (19 double + 38 single blocks)", lambda: flux_full_width(19, 38, None, None),
                     lambda t: flux_inputs(t, side, args.flux_text, 1, torch.float32, "meta")[0]),
                    ("Qwen-Image (60 blocks)", lambda: qwen_full_width(60, None, None),
                     lambda t: qwen_inputs(t, side, args.qwen_text, 1, torch.float32, "meta")[0])):
                f = count_flops(build, make, crit)
                msg = (f"{name} {side}x{side}: {f['tflops']['bare']:.1f} TFLOP/forward; critic +"
                       f"{f['overhead_pct']['critique']:.4f}% (critique), +{f['overhead_pct']['steer']:.4f}% (steer)")
                if "memory" in only:
                    f["memory_bf16"] = mem = count_memory(build, make, crit, torch.bfloat16)
                    msg += (f"; bf16 peak {mem['peak_mb']['bare']:.0f} MB, critic {mem['extra_mb']['critique']:+.1f}"
                            f" / {mem['extra_mb']['steer']:+.1f} MB")
                results["flops"].append({"name": name, "side": side, **f})
                print(msg, flush=True)
                save()
    if "toy" in only:
        from ..toy.editor import load_toy_editor, toy_pipeline_kwargs

        pipe, where = load_toy_editor(args.model)
        kw = toy_pipeline_kwargs(pipe)
        t = pipe.transformer.to(args.device, dtype)
        side = kw["height"]
        for batch in (1, 16):
            inputs, info = flux_inputs(t, side, kw["max_sequence_length"], batch, dtype, args.device,
                                       pipe.vae_scale_factor)
            record(f"toy editor {side}x{side} batch {batch}", t, inputs, info, 20 * args.repeats, MODES, True)
        results["toy_editor"] = str(where)
        del pipe, t
    fd, fs = (int(x) for x in args.flux_blocks.split(","))
    timed = [m for m in ("flux", "qwen") if m in only]
    for fam in timed:
        if fam == "flux":
            t = flux_full_width(fd, fs, dtype, args.device)
            label = f"FLUX.1 Kontext width, {fd} double + {fs} single"
        else:
            t = qwen_full_width(args.qwen_blocks, dtype, args.device)
            label = f"Qwen-Image width, {args.qwen_blocks} block(s)"
        for i, side in enumerate(sizes):
            if fam == "flux":
                inputs, info = flux_inputs(t, side, args.flux_text, 1, dtype, args.device)
            else:
                inputs, info = qwen_inputs(t, side, args.qwen_text, 1, dtype, args.device)
            reps = args.repeats * (2 if side <= 512 else 1)
            # steer_start 0: in steer mode the timed block steers (the default l_in + 1 would leave a one-block model
            # reading only, i.e. time critique mode twice); in a whole model all blocks but l_in steer
            record(f"{label}, {side}x{side}", t, inputs, info, reps, ("bare", "critique", "steer"), i == 0,
                   {**crit, "steer_start": 0})
            del inputs
        del t
    print(f"wrote {out}/cost.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

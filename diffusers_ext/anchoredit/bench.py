"""``editsteer bench anchoredit`` and ``editsteer bench refeed``: multi-turn drift on held-out toy-world sequences.

* ``anchoredit``: one :class:`~diffusers_ext.anchoredit.session.AnchorEditSession` per sequence; flags ablate the
  memory: ``--no-sink`` (the source may be evicted), ``--full-cache`` (keep every turn), ``--window N``.
* ``refeed``: the toy Kontext editor (``diffusers_ext.toy.editor``) re-fed its own output turn after turn, the
  single-turn baseline AnchorEdit is measured against.

Both seed turn ``i`` with ``case seed + 7919 i``. Besides the harness's ``drift_by_turn`` / ``success_by_turn``,
``anchoredit`` records per-turn wall time and KV-cache memory (``settings.time_s_by_turn``,
``settings.cache_mb_by_turn``).

Example::

    editsteer bench anchoredit --cases 8 --turns 12 --out runs/bench/anchoredit
    editsteer bench anchoredit --no-sink --cases 8 --turns 12 --out runs/bench/anchoredit-nosink
    editsteer bench refeed --cases 8 --turns 12 --out runs/bench/refeed
"""

from __future__ import annotations

import time

import numpy as np

from ..bench.base import BenchMethod, MethodResult
from .config import SEED_STRIDE


class AnchorEditMethod(BenchMethod):
    name = "anchoredit"
    kind = "multiturn"
    description = "AnchorEdit: causal Wan turns over an anchored sink + window KV cache (toy model by default)"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--model", default=None, help="artifact id or pipeline folder (default: toy-anchoredit)")
        parser.add_argument("--no-sink", action="store_true", help="ablation: sink 0 (the source can be evicted)")
        parser.add_argument("--full-cache", action="store_true", help="ablation: keep every turn (no window)")
        parser.add_argument("--window", type=int, default=None, help="recent turns kept (default: the model's)")
        parser.add_argument("--sampler", choices=("default", "distilled", "flow"), default="default",
                            help="per-turn schedule (default: the model's)")
        parser.add_argument("--flow-steps", type=int, default=None, help="steps of the flow sampler")
        parser.add_argument("--device", default="cpu")

    def __init__(self, args):
        super().__init__(args)
        import torch

        from ..errors import EditSteerConfigError
        from .config import SamplerConfig
        from .pipeline import AnchorEditPipeline

        self.torch = torch
        self.pipe = AnchorEditPipeline.from_toy(args.model, device=args.device)
        cfg = self.pipe.anchoredit_config
        if args.full_cache and args.window is not None:
            raise EditSteerConfigError("--full-cache and --window exclude each other")
        changes = {}
        if args.no_sink:
            changes["sink"] = 0
        if args.full_cache:
            changes["window"] = None
        if args.window is not None:
            changes["window"] = args.window
        turns = getattr(args, "turns", 12)
        if turns > cfg.max_turns:
            changes["max_turns"] = turns
        if changes:
            self.pipe.set_anchoredit(cfg.replace(**changes))
        sampler = self.pipe.sampler_config
        if args.sampler == "distilled":
            sampler = SamplerConfig.distilled()
        elif args.sampler == "flow":
            sampler = SamplerConfig.flow(steps=args.flow_steps or sampler.steps, shift=sampler.shift,
                                         guidance_scale=sampler.guidance_scale if sampler.kind == "flow" else 1.0)
        elif args.flow_steps is not None and sampler.kind == "flow":
            sampler = SamplerConfig.from_dict({**sampler.to_dict(), "steps": args.flow_steps})
        self.sampler = sampler
        self._times: list[list[float]] = []
        self._mem: list[list[float]] = []
        self._frames: list[list[int]] = []

    def settings(self) -> dict:
        def mean_by_turn(rows):
            if not rows:
                return []
            n = min(len(r) for r in rows)
            return [float(np.mean([r[i] for r in rows])) for i in range(n)]

        return {"model": self.args.model or "toy-anchoredit", "anchoredit": self.pipe.anchoredit_config.to_dict(),
                "sampler": self.sampler.to_dict(), "nfe_per_turn": self.sampler.nfe_per_turn,
                "time_s_by_turn": mean_by_turn(self._times), "cache_mb_by_turn": mean_by_turn(self._mem),
                "cache_frames_by_turn": self._frames[0] if self._frames else [],
                "threads": self.torch.get_num_threads()}

    def edit_sequence(self, seq, seed: int) -> list[MethodResult]:
        session = self.pipe.start_session(seq.source, seed=seed, sampler=self.sampler)
        out, times, mem, frames = [], [], [], []
        for i, text in enumerate(seq.instructions):
            t0 = time.perf_counter()
            img = session.edit(text, output_type="np")
            dt = time.perf_counter() - t0
            mb = session.cache_bytes() / 2**20
            times.append(dt)
            mem.append(mb)
            frames.append(len(session.cache.frames))
            nfe = self.sampler.nfe_per_turn + (1 if i == 0 else 0)  # the first turn also writes the source
            out.append(MethodResult(image=img, nfe=nfe, extras={"time_s": dt, "cache_mb": mb,
                                                                "cache_frames": session.cache.frames}))
        self._times.append(times)
        self._mem.append(mem)
        self._frames.append(frames)
        return out


class RefeedMethod(BenchMethod):
    name = "refeed"
    kind = "multiturn"
    description = "baseline: the toy single-turn Kontext editor re-fed its own output at every turn"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--model", default=None, help="toy editor id or pipeline folder (default: the bundled)")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
        parser.add_argument("--device", default="cpu")

    def __init__(self, args):
        super().__init__(args)
        from ..toy.editor import load_toy_editor

        self.pipe, self.where = load_toy_editor(args.model, device=args.device)
        self._times: list[list[float]] = []

    def settings(self) -> dict:
        from ..toy.editor import toy_pipeline_kwargs

        kw = toy_pipeline_kwargs(self.pipe, num_inference_steps=self.args.steps)
        times = self._times
        n = min((len(r) for r in times), default=0)
        return {"model": self.args.model or "toy-kontext-editor", "where": self.where,
                "steps": kw["num_inference_steps"],
                "time_s_by_turn": [float(np.mean([r[i] for r in times])) for i in range(n)]}

    def edit_sequence(self, seq, seed: int) -> list[MethodResult]:
        from ..toy.editor import toy_edit

        current = seq.source
        out, times = [], []
        for i, text in enumerate(seq.instructions, start=1):
            t0 = time.perf_counter()
            res = toy_edit(self.pipe, current, text, steps=self.args.steps, seed=seed + SEED_STRIDE * i)
            times.append(time.perf_counter() - t0)
            current = res.image
            out.append(MethodResult(image=res.image, nfe=res.nfe))
        self._times.append(times)
        return out


__all__ = ["AnchorEditMethod", "RefeedMethod"]

"""``editsteer bench verilatent`` and ``editsteer bench bon``: VeriLatent against decode-then-verify best-of-N.

Both run the toy editor on held-out toy-world cases with the harness's per-case seed ``s``; every method's
candidate j uses seed ``s + j``, so candidate 0 of every method is the plain ``bench base`` output of that case.

* ``bon --n N``: N full runs in one batched call (N T NFE), all N decoded, then the *pixel verifier* picks one:
  the same activation-map/region/score rules as VeriLatent (:mod:`.core`) applied to ||decoded - source|| over
  RGB (pooled to ``--pool`` x ``--pool`` pixels), with the region from the N candidates' consensus. It sees the source
  image and the candidates only (never the ground-truth target or mask). ``--n 1`` is the single-sample baseline.
* ``verilatent --mode fixed|adaptive``: :class:`~.diffusers_wrapper.VeriLatentSearch`; candidates are judged
  after k early steps from x̂0 in latent space and never decoded.

Each case also records the time spent inside model calls (transformer, VAE, text encoders) and in the verifier, so
``results.json`` carries the overhead measurement (``settings.overhead``). The verifier's capture hooks run inside
the transformer's forward (the attention map of ``--activation mix|attention`` is recomputed there): their time
(``capture_s``) is counted as verifier time and taken out of model time.

Example::

    editsteer bench bon --n 8 --cases 48 --out runs/vl/bon8
    editsteer bench verilatent --mode adaptive --cases 48 --out runs/vl/adaptive
    python -m diffusers_ext.verilatent.report runs/vl     # table + quality-vs-NFE plot
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..bench.base import BenchMethod, MethodResult
from ..toy.bench import add_editor_arguments, load_editor


class ModelTimer:
    """Wall time spent inside model calls: transformer forwards, VAE encode/decode, text encoders (hooks and
    method wrappers, removed by :meth:`close`)."""

    def __init__(self, pipe):
        self.seconds = 0.0
        self.decodes = 0
        self._handles, self._patched, self._t0 = [], [], {}
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is not None:
                self._handles.append(m.register_forward_pre_hook(self._pre(name)))
                self._handles.append(m.register_forward_hook(self._post(name)))
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            for meth in ("encode", "decode"):
                self._wrap(vae, meth)

    def _pre(self, name):
        def hook(module, args):
            self._t0[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.seconds += time.perf_counter() - self._t0.pop(name, time.perf_counter())
        return hook

    def _wrap(self, obj, meth):
        orig = getattr(obj, meth)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                if meth == "decode":
                    self.decodes += 1

        setattr(obj, meth, timed)
        self._patched.append((obj, meth))

    def reset(self) -> None:
        self.seconds, self.decodes = 0.0, 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, meth in self._patched:
            obj.__dict__.pop(meth, None)
        self._handles, self._patched = [], []


def _add_verifier_args(p: argparse.ArgumentParser) -> None:
    from .config import VeriLatentConfig

    d = VeriLatentConfig()
    p.add_argument("--lam", type=float, default=d.lam, help="leak penalty weight (lambda)")
    p.add_argument("--mu", type=float, default=d.mu, help="edit-magnitude log term weight (mu)")
    p.add_argument("--region", choices=("consensus", "global"), default=d.region,
                   help="expected region: the candidates' consensus, or everywhere")
    p.add_argument("--consensus", choices=("contrast", "mean"), default=d.consensus,
                   help="consensus region: votes weighted by map contrast, or equal votes")
    p.add_argument("--no-leave-one-out", action="store_true", help="a candidate votes on its own region")
    p.add_argument("--global-coverage", type=float, default=d.global_coverage,
                   help="treat the edit as global when the consensus covers more than this (<=0: never)")
    p.add_argument("--normalise", choices=("max", "softmax"), default=d.normalise)


def _verifier_overrides(args) -> dict:
    gc = args.global_coverage
    return {"lam": args.lam, "mu": args.mu, "region": args.region, "consensus": args.consensus,
            "leave_one_out": not args.no_leave_one_out,
            "global_coverage": gc if gc is not None and gc > 0 else None, "normalise": args.normalise}


class _ToyMethod(BenchMethod):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        import torch

        self.pipe, self.where, self.kwargs = load_editor(args)
        self.timer = ModelTimer(self.pipe)
        self.totals = {"wall_s": 0.0, "model_s": 0.0, "verify_s": 0.0, "capture_s": 0.0}
        self._torch = torch

    def _generator(self, seed: int):
        return self._torch.Generator().manual_seed(seed)

    def _account(self, wall: float, verify: float, capture: float = 0.0) -> dict:
        """``capture``: the part of ``verify`` that ran inside model calls (hooks), moved from model time."""
        model = max(0.0, self.timer.seconds - capture)
        self.totals["wall_s"] += wall
        self.totals["model_s"] += model
        self.totals["verify_s"] += verify
        self.totals["capture_s"] += capture
        return {"wall_s_method": wall, "model_s": model, "verify_s": verify, "capture_s": capture,
                "overhead_frac": (wall - model) / wall if wall > 0 else 0.0}

    def _overhead(self) -> dict:
        t = self.totals
        w = max(t["wall_s"], 1e-12)
        return {**t, "non_model_frac": (t["wall_s"] - t["model_s"]) / w, "verify_frac": t["verify_s"] / w,
                "definition": "non_model_frac = 1 - (time inside transformer/VAE/text-encoder calls, less the "
                              "verifier's capture hooks) / method wall; verify_frac = time in the verifier (maps, "
                              "region, score, policy, x0 capture, and the capture hooks inside the transformer, "
                              "capture_s: the attention-map recomputation of activation mix/attention) / wall"}

    def _common_settings(self) -> dict:
        from ..toy.editor import TOY_EDITOR_ID

        return {"model": self.args.model or TOY_EDITOR_ID, "loaded_from": self.where,
                **{k: v for k, v in self.kwargs.items() if not k.startswith("_")}}


class BestOfNMethod(_ToyMethod):
    """Best-of-N with decode-then-verify: N full runs, N decodes, the pixel verifier picks one (no ground truth)."""

    name = "bon"
    kind = "single"
    description = "best-of-N: N full runs decoded, a ground-truth-free pixel verifier picks one (N T NFE)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_editor_arguments(parser)
        parser.add_argument("--n", type=int, default=4, help="candidates (1 = the single-sample baseline)")
        parser.add_argument("--verifier", choices=("score", "medoid"), default="score",
                            help="score: VeriLatent's map/region score on |decoded - source|; medoid: the candidate "
                                 "closest to all others (self-consistency)")
        parser.add_argument("--pool", type=int, default=2,
                            help="the score verifier pools |decoded - source| over pool x pool pixels")
        _add_verifier_args(parser)

    def __init__(self, args: argparse.Namespace):
        from ..errors import EditSteerConfigError
        from .config import VeriLatentConfig

        if args.n < 1:
            raise EditSteerConfigError("--n must be at least 1 (N < 1 leaves nothing to choose from)")
        super().__init__(args)
        self.config = VeriLatentConfig(**_verifier_overrides(args))

    def settings(self) -> dict:
        verifier = ("medoid of the decoded candidates (core.medoid_ranking)" if self.args.verifier == "medoid" else
                    "pixel score: core.pixel_activation + core.judge_maps (consensus region)")
        return {**self._common_settings(), "n": self.args.n, "pool": self.args.pool,
                "verifier_kind": self.args.verifier,
                "verifier": verifier + "; sees the source and the candidates only, never the ground truth",
                "verifier_config": self.config.to_dict(), "overhead": self._overhead()}

    def edit(self, case, seed: int) -> MethodResult:
        import torch

        from ..toy import world as W
        from ..toy.editor import nfe_of
        from . import core

        n = self.args.n
        self.timer.reset()
        t0 = time.perf_counter()
        out = self.pipe(image=W.to_pil(case.source), prompt=case.instruction, num_images_per_prompt=n,
                        generator=[self._generator(seed + j) for j in range(n)], output_type="np",
                        **self.kwargs).images
        tv = time.perf_counter()
        best, extras = 0, {}
        if n > 1:
            imgs = torch.from_numpy(np.clip(out, 0, 1))
            if self.args.verifier == "medoid":
                best = core.medoid_ranking(imgs)[0]
            else:
                src = torch.from_numpy(case.source.astype(np.float32) / 255.0)
                j = core.judge_maps(core.pixel_activation(imgs, src, self.args.pool), self.config,
                                    scale=core.source_scale(src.reshape(-1, 3)))
                best = j.ranking()[0]
                extras = {"scores": j.scores.tolist(), "region_kind": j.region.kind}
        verify = time.perf_counter() - tv
        wall = time.perf_counter() - t0
        img = (np.clip(out[best], 0, 1) * 255).round().astype(np.uint8)
        return MethodResult(image=img, nfe=nfe_of(self.kwargs) * n, extras={
            "edit_family": case.family, "chosen_seed": seed + best, "candidates": n, **extras,
            **self._account(wall, verify)})


class VeriLatentMethod(_ToyMethod):
    """VeriLatent on the toy editor (fixed or adaptive budget)."""

    name = "verilatent"
    kind = "single"
    description = "VeriLatent: candidates judged after k steps in latent space (no decode), adaptive budget"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        from .config import VeriLatentConfig

        d = VeriLatentConfig.adaptive()
        add_editor_arguments(parser)
        parser.add_argument("--mode", choices=("fixed", "adaptive"), default="adaptive",
                            help="fixed: one round of --n0 candidates; adaptive: rounds of --round-size up to --n-max")
        parser.add_argument("--n0", type=int, default=None,
                            help=f"first-round candidates (default: {d.n0} adaptive, 8 fixed)")
        parser.add_argument("--n-max", type=int, default=d.n_max, help="adaptive: most candidates in all")
        parser.add_argument("--round-size", type=int, default=d.round_size, help="adaptive: candidates per extra round")
        parser.add_argument("--k", type=int, default=d.k, help="early steps before judging (1 <= k < T)")
        parser.add_argument("--top-m", type=int, default=d.top_m, help="finalists continued to the last step")
        parser.add_argument("--activation", choices=("latent", "attention", "mix"), default=d.activation)
        parser.add_argument("--attention-weight", type=float, default=d.attention_weight)
        parser.add_argument("--tau-easy", type=float, default=None,
                            help="adaptive: an edit whose best score reaches this is easy and stops (default: the "
                                 "calibrated value of the activation map, see config.TAU_EASY_DEFAULT)")
        parser.add_argument("--tau-margin", type=float, default=d.tau_margin)
        _add_verifier_args(parser)

    def __init__(self, args: argparse.Namespace):
        from .config import VeriLatentConfig
        from .diffusers_wrapper import VeriLatentSearch

        common = dict(k=args.k, top_m=args.top_m, activation=args.activation, attention_weight=args.attention_weight,
                      tau_easy=args.tau_easy, tau_margin=args.tau_margin, **_verifier_overrides(args))
        if args.mode == "fixed":
            self.config = VeriLatentConfig.fixed(args.n0 or 8, **common)
        else:
            self.config = VeriLatentConfig.adaptive(n0=args.n0 or 4, n_max=args.n_max, round_size=args.round_size,
                                                    **common)
        super().__init__(args)
        self.search = VeriLatentSearch(self.pipe, self.config)

    def settings(self) -> dict:
        return {**self._common_settings(), "mode": self.args.mode, "config": self.config.to_dict(),
                "overhead": self._overhead()}

    def edit(self, case, seed: int) -> MethodResult:
        from ..toy import world as W

        self.timer.reset()
        t0 = time.perf_counter()
        out = self.search(image=W.to_pil(case.source), prompt=case.instruction, generator=self._generator(seed),
                          output_type="np", **self.kwargs)
        wall = time.perf_counter() - t0
        r = out.report
        img = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
        pictures = {}
        maps = r.maps()
        if maps:
            size = case.source.shape[0]
            up = lambda m: np.kron(m.numpy(), np.ones((size // m.shape[0], size // m.shape[1])))  # noqa: E731
            pictures["region"] = np.clip(up(maps["region"]), 0, 1)
            pictures["chosen_map"] = np.clip(up(maps["normalised"][r.chosen]), 0, 1)
        return MethodResult(image=img, nfe=r.nfe, images=pictures, extras={
            "edit_family": case.family, "chosen_seed": r.chosen_seeds[0], "candidates": r.candidates,
            "rounds": r.rounds, "bucket": r.bucket, "round_one_best": r.round_one["best"] if r.round_one else None,
            "round_one_margin": r.round_one["margin"] if r.round_one else None,
            "best_score": r.difficulty["best"] if r.difficulty else None, "region_kind": r.region_kind,
            "nfe_measured": r.nfe_measured, "decodes": self.timer.decodes,
            **self._account(wall, r.verify_s, r.capture_s)})

"""Benchmarks of MLN on held-out toy-world edits: ``editsteer bench mln`` and ``editsteer bench regen``.

Both turn the case's source caption into its target caption: MLN edits the source image; ``regen`` generates a new
image from the target caption with the same seed and the same sampling settings (the baseline MLN must beat on
background fidelity). ``--captions`` picks the captions (:mod:`~diffusers_ext.mln.captions`): ``focus`` (default)
names the edited object and the background only, as a real edit prompt does; ``full`` is the toy world's exact
description of every object, from which a well-trained toy Switti regenerates the whole scene (regeneration is then
an oracle of the background, not the baseline the method is about). Ablations are flags of ``mln``:

* ``--no-mask``: an empty mask (out-of-mask nudging and refinement everywhere; only the TV weight frees tokens);
* ``--no-nudge``: beta = alpha = 0 (the preset's copied coarse scales, CFG with the source prompt as negative,
  refinement);
* ``--no-refine``: no quantisation refinement;
* ``--global-edit``: mask everywhere, no refinement (MLN's style-edit mode);
* ``--gt-mask``: the case's exact edit mask as the user mask (separates mask quality from generation quality, as
  the "GT mask" rows of the published tables do);
* ``--fast``: EditSteer's speed variant (:meth:`MLNConfig.fast`: mask from the second-to-last scale, no TV weight on
  the last scale), not an ablation but its quality check;
* ``--set KEY=VALUE`` (repeatable): any :class:`MLNConfig` field, the value read as JSON (``--set copy_scales=0
  --set 'alphas=[0,0,0,0,0,0]'``), applied after the flags above: for tuning a preset on training-split cases.

Example::

    editsteer bench mln --cases 48 --out runs/bench-mln
    editsteer bench mln --cases 48 --no-refine --out runs/bench-mln-norefine
    editsteer bench regen --cases 48 --out runs/bench-regen
"""

from __future__ import annotations

import argparse

import numpy as np

from ..bench.base import BenchMethod, MethodResult
from .captions import CAPTION_MODES, case_captions

DEFAULT_MODEL = "toy-switti"


def _caption_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captions", choices=CAPTION_MODES, default="focus",
                        help="focus: the edited object and the background only (default); full: every object")


def load_pipeline(model: str | None, cls):
    """A pipeline of class ``cls`` from a manifest id or a folder (the bundled toy Switti by default)."""
    from pathlib import Path

    from ..weights import resolve

    src = model or DEFAULT_MODEL
    path = Path(src) if Path(src).is_dir() else resolve(src).path
    pipe = cls.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, str(path)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def parse_overrides(items: list[str]) -> dict:
    """``["copy_scales=0", "alphas=[0,0]"]`` -> ``{"copy_scales": 0, "alphas": (0, 0)}``; unknown fields and bad
    values are :class:`EditSteerConfigError` (raised here or by the config's own validation)."""
    import dataclasses
    import json

    from ..errors import EditSteerConfigError
    from .config import MLNConfig

    known = {f.name for f in dataclasses.fields(MLNConfig)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise EditSteerConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise EditSteerConfigError(f"--set {item!r}: the value must be JSON (numbers, true/false, [lists], "
                                       '"strings")') from None
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = pred > 0.5, gt.astype(bool)
    union = (p | g).sum()
    return float((p & g).sum() / union) if union else float("nan")


class MLNMethod(BenchMethod):
    name = "mln"
    kind = "single"
    description = "Masked Logit Nudging on the toy Switti: source caption -> target caption (training-free)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default=None, help=f"manifest id or pipeline folder (default {DEFAULT_MODEL})")
        parser.add_argument("--preset", default=None, help="MLN preset (default: the model's: toy / 512 / 1024)")
        parser.add_argument("--no-mask", action="store_true", help="ablation: empty mask (anchor everywhere)")
        parser.add_argument("--no-nudge", action="store_true", help="ablation: beta = alpha = 0")
        parser.add_argument("--no-refine", action="store_true", help="ablation: no quantisation refinement")
        parser.add_argument("--global-edit", action="store_true", help="mask everywhere, no refinement")
        parser.add_argument("--gt-mask", action="store_true", help="oracle: the exact edit mask as the user mask")
        parser.add_argument("--fast", action="store_true", help="speed variant: earlier mask scale, no last-scale TV")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                            help="override an MLNConfig field (value as JSON), e.g. --set copy_scales=0; repeatable")
        parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        _caption_argument(parser)

    def __init__(self, args):
        super().__init__(args)
        from .config import MLNConfig
        from .pipeline import MLNPipeline

        _threads(args.threads)
        self.pipe, self.where = load_pipeline(args.model, MLNPipeline)
        K = len(self.pipe.patch_nums)
        cfg = MLNConfig.preset(args.preset) if args.preset else MLNConfig.for_num_scales(K)
        if args.no_nudge:
            cfg = cfg.replace(beta=0.0, alphas=(0.0,) * K)
        if args.no_refine:
            cfg = cfg.replace(refine_steps=0)
        if args.global_edit:
            cfg = cfg.replace(global_edit=True)
        if args.fast:
            cfg = cfg.fast()
        if getattr(args, "overrides", None):
            cfg = cfg.replace(**parse_overrides(args.overrides))
        self.captions = args.captions
        self.no_mask = bool(args.no_mask)
        self.gt_mask = bool(args.gt_mask)
        self.config = cfg
        self.variant = "+".join(f for f, on in (("no-mask", args.no_mask), ("no-nudge", args.no_nudge),
                                                 ("no-refine", args.no_refine), ("global-edit", args.global_edit),
                                                 ("gt-mask", args.gt_mask), ("fast", args.fast))
                                if on) or "full"
        if getattr(args, "overrides", None):
            self.variant += "+set:" + ",".join(args.overrides)

    def settings(self) -> dict:
        return {"model": self.where, "captions": self.captions, "variant": self.variant,
                "config": self.config.to_json()}

    def edit(self, case, seed: int) -> MethodResult:
        from ..toy import world as W

        G = self.pipe.patch_nums[-1]
        mask = np.zeros((G, G), np.float32) if self.no_mask else None
        if self.gt_mask:
            mask = case.mask.astype(np.float32)
        source, target = case_captions(case, self.captions)
        out = self.pipe(W.to_pil(case.source), source, target, mask=mask,
                        config=self.config, seed=seed, output_type="np")
        img = (out.images[0] * 255).round().astype(np.uint8)
        m = out.masks[0]
        return MethodResult(image=img, nfe=int(out.info["nfe"]),
                            extras={"mask_fraction": float((m > 0.5).mean()), "mask_iou": _mask_iou(m, case.mask),
                                    "mask_source": out.info.get("mask_source"), "edit_s": out.info.get("total_s")},
                            images={"mask": (m > 0.5)})


class RegenMethod(BenchMethod):
    name = "regen"
    kind = "single"
    description = "regenerate from the target caption with the same seed (plain toy Switti; MLN's baseline)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default=None, help=f"manifest id or pipeline folder (default {DEFAULT_MODEL})")
        parser.add_argument("--preset", default=None, help="sampling settings of this MLN preset (default: model's)")
        parser.add_argument("--negative", choices=("empty", "source"), default="empty",
                            help="CFG negative: the empty prompt (plain generation) or the source caption")
        parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        _caption_argument(parser)

    def __init__(self, args):
        super().__init__(args)
        from ..switti import SwittiPipeline
        from .config import MLNConfig

        _threads(args.threads)
        self.pipe, self.where = load_pipeline(args.model, SwittiPipeline)
        K = len(self.pipe.patch_nums)
        self.config = MLNConfig.preset(args.preset) if args.preset else MLNConfig.for_num_scales(K)
        self.negative = args.negative
        self.captions = args.captions

    def settings(self) -> dict:
        c = self.config
        return {"model": self.where, "captions": self.captions, "negative": self.negative, "guidance_scale": c.cfg,
                "top_k": c.top_k, "top_p": c.top_p, "smooth_start_si": c.smooth_start,
                "turn_off_cfg_start_si": c.cfg_stop, "last_scale_temp": c.last_temp,
                "reseed_every_scale": c.reseed_every_scale}

    def edit(self, case, seed: int) -> MethodResult:
        c = self.config
        source, target = case_captions(case, self.captions)
        neg = source if self.negative == "source" else ""
        img = self.pipe(target, negative_prompt=neg, guidance_scale=c.cfg, top_k=c.top_k, top_p=c.top_p,
                        smooth_start_si=c.smooth_start, turn_off_cfg_start_si=c.cfg_stop, last_scale_temp=c.last_temp,
                        seed=seed, reseed_every_scale=c.reseed_every_scale, output_type="np").images[0]
        K = len(self.pipe.patch_nums)
        return MethodResult(image=(img * 255).round().astype(np.uint8), nfe=2 * c.cfg_stop + (K - c.cfg_stop))

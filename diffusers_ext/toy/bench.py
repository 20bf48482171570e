"""``editsteer bench base``: the toy editor as it ships, the reference every method is compared against.

Example::

    editsteer bench base --cases 60 --seed 0            # runs/bench/base/results.json + grid.png
    editsteer bench base --steps 4 --model runs/toy-editor/pipeline
"""

from __future__ import annotations

import argparse

from ..bench.base import BenchMethod, MethodResult


def add_editor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--steps`` and ``--device``: the toy editor options every bench method built on it shares."""
    parser.add_argument("--model", default=None,
                        help="toy editor: weights manifest id or pipeline folder (default: the bundled "
                             "toy-kontext-editor)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    parser.add_argument("--device", default="cpu")


def load_editor(args: argparse.Namespace, pipeline_cls=None, **overrides):
    """The toy editor of :func:`add_editor_arguments`' options: ``(pipe, where, call kwargs)``; ``overrides`` go into
    the call kwargs (:func:`~diffusers_ext.toy.editor.toy_pipeline_kwargs`)."""
    from ..errors import EditSteerConfigError
    from .editor import load_toy_editor, toy_pipeline_kwargs

    if args.steps is not None and args.steps < 1:
        raise EditSteerConfigError("--steps must be at least 1")
    pipe, where = load_toy_editor(args.model, device=args.device, pipeline_cls=pipeline_cls)
    return pipe, where, toy_pipeline_kwargs(pipe, num_inference_steps=args.steps, **overrides)


class BaseEditorMethod(BenchMethod):
    """One plain ``FluxKontextPipeline`` call per case on the toy editor (NFE = steps, x2 with true CFG)."""

    name = "base"
    kind = "single"
    description = "the toy FLUX.1-Kontext-class editor, one plain pipeline call per case"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_editor_arguments(parser)
        parser.add_argument("--true-cfg", type=float, default=None,
                            help="true CFG scale against the empty prompt (default: the model's own, 1 = off)")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        over = {}
        if args.true_cfg is not None and args.true_cfg > 1.0:
            over.update(true_cfg_scale=args.true_cfg, negative_prompt="")
        self.pipe, self.where, self.kwargs = load_editor(args, **over)

    def settings(self) -> dict:
        from .editor import TOY_EDITOR_ID

        return {"model": self.args.model or TOY_EDITOR_ID, "loaded_from": self.where,
                **{k: v for k, v in self.kwargs.items() if not k.startswith("_")}}

    def edit(self, case, seed: int) -> MethodResult:
        import torch

        from . import world as W
        from .editor import nfe_of

        out = self.pipe(image=W.to_pil(case.source), prompt=case.instruction,
                        generator=torch.Generator().manual_seed(seed), output_type="np", **self.kwargs).images[0]
        img = (out.clip(0, 1) * 255).round().astype("uint8")
        return MethodResult(image=img, nfe=nfe_of(self.kwargs))


METRIC_KEYS = ("edit_success", "edit_region_mse", "edit_accuracy", "background_psnr", "leakage", "psnr", "ssim")


def metrics_by_family(results: dict, keys: tuple[str, ...] = METRIC_KEYS) -> dict[str, dict[str, float]]:
    """Per-family means of a single-turn ``results.json`` (its ``per_case`` rows carry ``family``), plus ``n``.

    Example::

        import json
        from diffusers_ext.toy.bench import metrics_by_family
        metrics_by_family(json.load(open("runs/bench/base/results.json")))["recolour"]["edit_success"]
    """
    import math

    from . import world as W

    out: dict[str, dict[str, float]] = {}
    rows = results.get("per_case", [])
    for fam in W.FAMILIES:
        sel = [r for r in rows if r.get("family") == fam]
        if not sel:
            continue
        fam_out = {"n": float(len(sel))}
        for k in keys:
            vals = [r[k] for r in sel if isinstance(r.get(k), (int, float)) and not math.isnan(r[k])]
            fam_out[k] = sum(vals) / len(vals) if vals else float("nan")
        out[fam] = fam_out
    return out


def family_table(results: dict, keys: tuple[str, ...] = ("edit_success", "edit_region_mse", "background_psnr")) -> str:
    """A Markdown table of :func:`metrics_by_family` (one row per family)."""
    fams = metrics_by_family(results, keys)
    lines = ["| family | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for fam, m in fams.items():
        lines.append(f"| {fam} | {int(m['n'])} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)

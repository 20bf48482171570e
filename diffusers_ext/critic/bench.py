"""``editsteer bench critic``: the toy editor with an Inline Critic, case for case against ``editsteer bench base``.

Same cases, same per-case seeds, same call settings as the base editor; the only difference is the critic
(``--mode steer`` by default). Each case also saves the critic's predicted error map (``error_map.png``) and records
how much of the predicted error falls inside the edit region.

Example::

    editsteer bench base   --cases 48 --seed 0 --out runs/bench/base
    editsteer bench critic --cases 48 --seed 0 --out runs/bench/critic
    editsteer bench critic --cases 48 --seed 0 --variant stage3-only --out runs/bench/critic-stage3only
"""

from __future__ import annotations

import argparse

import numpy as np

from ..bench.base import BenchMethod, MethodResult
from ..toy.bench import add_editor_arguments, load_editor

VARIANTS = {"full": "toy-critic", "stage3-only": "toy-critic-stage3only"}


class CriticMethod(BenchMethod):
    name = "critic"
    kind = "single"
    description = "Inline Critic on the toy editor (a learned token steering the frozen editor); error map per case"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_editor_arguments(parser)
        parser.add_argument("--weights", default=None,
                            help="critic: manifest id, folder, critic.safetensors or Hub repo (overrides --variant)")
        parser.add_argument("--variant", default="full", choices=tuple(VARIANTS),
                            help="bundled critic: full three-stage recipe, or the stage-3-only ablation")
        parser.add_argument("--mode", default="steer", choices=("off", "critique", "steer"),
                            help="critic mode (off = the frozen editor through the same code path)")
        parser.add_argument("--scale", type=float, default=None, help="steer scale (default: the critic's)")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        from .pipelines import InlineCriticKontextPipeline

        self.pipe, self.where, self.kwargs = load_editor(args, pipeline_cls=InlineCriticKontextPipeline)
        self.weights = args.weights or VARIANTS[args.variant]
        self.critic = self.pipe.load_critic(self.weights, mode=args.mode, scale=args.scale)

    def settings(self) -> dict:
        kw = self.kwargs
        c = self.critic.config
        return {"editor": str(self.where), "critic": str(self.weights), "mode": self.pipe.critic_mode,
                "scale": self.pipe.critic_scale if self.pipe.critic_scale is not None else c.steer_scale,
                "critic_config": {k: v for k, v in c.to_dict().items() if k != "extra"},
                "pipeline_kwargs": {k: v for k, v in kw.items() if isinstance(v, (int, float, str, bool))}}

    def edit(self, case, seed: int) -> MethodResult:
        import torch

        from ..toy import world as W
        from ..toy.editor import nfe_of
        from .pipelines import error_map_image

        kw = self.kwargs
        out = self.pipe(image=[W.to_pil(case.source)], prompt=[case.instruction],
                        generator=[torch.Generator().manual_seed(seed)], output_type="np", **kw)
        img = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
        extras, images = {}, {}
        if out.error_maps is not None:
            m = out.error_maps[0].numpy()
            images["error_map"] = error_map_image(m, size=img.shape[:2])
            up = np.kron(m, np.ones((img.shape[0] // m.shape[0], img.shape[1] // m.shape[1])))
            if up.shape == case.mask.shape and case.mask.any() and (~case.mask).any():
                extras["critic_error_in_mask"] = float(up[case.mask].mean())
                extras["critic_error_outside_mask"] = float(up[~case.mask].mean())
        return MethodResult(image=img, nfe=nfe_of(kw), extras=extras, images=images)

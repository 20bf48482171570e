"""Shared builders for the Switti / MLN tests (import explicitly: ``from fixtures_mln import ...``)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PS = "a large red circle at the center on a black background"
PT = "a large blue circle at the center on a black background"


@lru_cache(maxsize=None)
def tiny_config():
    from diffusers_ext.switti.tiny import TinySwittiConfig
    from diffusers_ext.toy import world

    return TinySwittiConfig(words=tuple(world.vocabulary()))


def tiny_mln_pipeline(seed: int = 0):
    """An untrained tiny MLNPipeline (16 px, scales 1-2-3-4), progress bars off."""
    from diffusers_ext.mln import MLNPipeline
    from diffusers_ext.switti.tiny import tiny_switti_pipeline

    pipe = tiny_switti_pipeline(tiny_config(), seed=seed, pipeline_cls=MLNPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_mln_config(**kw):
    from diffusers_ext.mln import MLNConfig

    base = dict(num_scales=4, copy_scales=1, alphas=(8.0, 6.0, 3.0, 1.0), top_k=10, name="tiny")
    return MLNConfig(**{**base, **kw})


def random_image(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def state_snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module, snap: dict) -> bool:
    import torch

    now = module.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)

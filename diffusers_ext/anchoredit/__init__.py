"""AnchorEdit: many editing turns without identity drift, on diffusers' Wan transformer.

Each editing turn is one latent frame of a frame-causal Wan; frame 0 (the source) is an attention sink that is never
evicted from the KV cache, recent turns stay in a sliding window, temporal RoPE is strided between turns, and the
clean prediction of a finished turn is written back into the cache. See ``methods.md`` section 2.

Entry points (imported lazily, so ``import diffusers_ext.anchoredit`` stays cheap)::

    from diffusers_ext.anchoredit import (AnchorEditConfig, SamplerConfig, apply_anchoredit, remove_anchoredit,
                                          anchoredit_forward, AnchorKVCache, AnchorEditPipeline, AnchorEditSession)
    pipe = AnchorEditPipeline.from_toy()                    # bundled toy model, offline
    session = pipe.start_session(image, seed=0)
    image1 = session.edit("make the red circle blue")
    session.undo(); session.save("my_session")              # my_session.safetensors + my_session.json
"""

from __future__ import annotations

import importlib

from .config import DISTILLED_TIMESTEPS, SEED_STRIDE, AnchorEditConfig, SamplerConfig

_LAZY = {
    "AnchorKVCache": ".cache",
    "apply_anchoredit": ".apply",
    "remove_anchoredit": ".apply",
    "anchoredit_forward": ".apply",
    "get_runtime": ".apply",
    "AnchorEditRuntime": ".attention",
    "sample_turn": ".sampling",
    "AnchorEditPipeline": ".pipeline",
    "AnchorEditSession": ".session",
    "TurnRecord": ".session",
}

__all__ = ["AnchorEditConfig", "DISTILLED_TIMESTEPS", "SEED_STRIDE", "SamplerConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

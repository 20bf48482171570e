"""Masked Logit Nudging (MLN): training-free prompt-to-prompt editing for scale-wise VAR models (Switti).

* :class:`MLNPipeline`: image + source prompt + target prompt -> edited image and the mask used;
* :class:`MLNConfig`: settings and presets (``"512"``, ``"1024"``: official code v2; ``"toy"``);
* :func:`mln_edit`: the method over any VAR backbone; :class:`MaskedLogitSampler` and its processors
  (:class:`SourceNudge`, :class:`ClassifierFreeGuidance`, :class:`Temperature`): the reusable per-scale sampler.

Example::

    from diffusers_ext.mln import MLNPipeline
    pipe = MLNPipeline.from_switti_checkpoints("yresearch/Switti")
    out = pipe(photo, "a cat sitting on rocks", "a dog sitting on rocks", seed=42)
"""

from importlib import import_module

_EXPORTS = {
    "MLNConfig": ".config", "PRESETS": ".config", "SMOOTH_512": ".config", "interpolate_schedule": ".config",
    "MLNPipeline": ".pipeline", "MLNPipelineOutput": ".pipeline",
    "mln_edit": ".core", "MLNResult": ".core", "build_sampler": ".core", "compute_edit_mask": ".core",
    "MaskedLogitSampler": ".sampler", "ScaleState": ".sampler", "VARBackbone": ".sampler", "MLNBackbone": ".sampler",
    "SourceNudge": ".sampler", "ClassifierFreeGuidance": ".sampler", "Temperature": ".sampler",
    "SwittiTokenSampling": ".sampler", "nudge_logits": ".nudge", "tv_weight": ".nudge",
    "refine_outside_mask": ".refine", "shim_path": ".shim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Inline Critic: a learned token that rides along the forward pass of a frozen editor, critiques its intermediate
predictions (a per-token error map) and steers the later layers (``methods.md`` §1).

Core (plain torch): :class:`CriticConfig`, :class:`InlineCritic`, :mod:`~diffusers_ext.critic.core`.
diffusers adapter: :func:`apply_inline_critic` / :func:`remove_inline_critic` (FLUX.1 Kontext and Qwen-Image
transformers), :class:`InlineCriticKontextPipeline`, :class:`InlineCriticQwenEditPipeline`.
Commands: ``editsteer probe``, ``editsteer train critic``, ``editsteer bench critic``,
``python -m diffusers_ext.critic.cost``.

Example::

    from diffusers_ext.critic import InlineCriticKontextPipeline
    from diffusers_ext.toy.editor import load_toy_editor, toy_pipeline_kwargs
    from diffusers_ext.toy import world
    pipe, _ = load_toy_editor(pipeline_cls=InlineCriticKontextPipeline)
    pipe.load_critic("toy-critic", mode="steer")
    case = world.make_case("heldout", seed=0, index=0)
    out = pipe(image=world.to_pil(case.source), prompt=case.instruction, output_type="np",
               **toy_pipeline_kwargs(pipe))
    out.images[0].shape, out.error_maps.shape               # (32, 32, 3), (1, h, w)

Everything is imported on first use, so ``import diffusers_ext.critic`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CriticConfig": "config", "MODES": "config",
    "InlineCritic": "module", "ProbeHeads": "module",
    "apply_inline_critic": "apply", "remove_inline_critic": "apply", "installed_critic": "apply",
    "critic_config_for": "apply", "describe_transformer": "apply", "InstalledCritic": "apply",
    "InlineCriticKontextPipeline": "pipelines", "InlineCriticQwenEditPipeline": "pipelines",
    "InlineCriticPipelineOutput": "pipelines", "shim_path": "pipelines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

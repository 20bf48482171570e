"""Turn a diffusers ``WanTransformer3DModel`` into AnchorEdit's causal turn-by-turn editor, and back.

``apply_anchoredit(transformer, AnchorEditConfig(...))`` installs processors on every block's self- and
cross-attention and two hooks (the transformer's forward and its rotary embedding); it changes no weight, so the
transformer keeps its ``state_dict``, ``save_pretrained`` and ``from_pretrained``. ``remove_anchoredit`` puts the
original processor objects back and removes the hooks: the model is exactly as it was.

Example::

    import torch
    from diffusers_ext.tiny import tiny_wan_transformer, TinyWanConfig
    from diffusers_ext.anchoredit import AnchorEditConfig, anchoredit_forward, apply_anchoredit, remove_anchoredit

    transformer = tiny_wan_transformer(TinyWanConfig(rope_max_seq_len=256))
    runtime = apply_anchoredit(transformer, AnchorEditConfig(sink=1, window=4))
    x = torch.randn(1, 16, 3, 8, 8)                 # source + 2 turns, one latent frame each
    t = torch.tensor([[0.0, 500.0, 900.0]])          # one timestep per frame
    ctx = torch.randn(1, 3, 7, 32)                   # one instruction per frame (frame 0: the empty one)
    v = anchoredit_forward(transformer, x, t, ctx)   # full-sequence frame-causal forward (training)

    cache = runtime.new_cache()                      # incremental decoding, one frame per call
    for i in range(3):
        vi = anchoredit_forward(transformer, x[:, :, i:i + 1], t[:, i:i + 1], ctx[:, i:i + 1], cache=cache, write=True)
    remove_anchoredit(transformer)
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from ..errors import EditSteerConfigError, ModelFamilyError
from .attention import (
    CACHE_KWARG,
    WRITE_KWARG,
    AnchorEditCrossAttnProcessor,
    AnchorEditRuntime,
    AnchorEditSelfAttnProcessor,
    RopeHook,
    TransformerHook,
)
from .cache import AnchorKVCache
from .config import AnchorEditConfig

TRANSFORMER_HOOK = "editsteer_anchoredit"
ROPE_HOOK = "editsteer_anchoredit_rope"
_ATTR = "_editsteer_anchoredit"


def _unwrap(model):
    """The transformer inside torch.compile / DDP / FSDP wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


def _check_family(transformer) -> None:
    from diffusers import WanTransformer3DModel

    if not isinstance(transformer, WanTransformer3DModel):
        raise ModelFamilyError(f"AnchorEdit extends diffusers' WanTransformer3DModel (Wan 2.1 T2V); got "
                               f"{type(transformer).__name__}. Load the transformer of a Wan2.1-T2V checkpoint.")
    cfg = transformer.config
    if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
        raise ModelFamilyError("AnchorEdit needs a text-to-video Wan transformer; this one has image-conditioning "
                               "projections (I2V). Use a Wan2.1-T2V checkpoint.")
    if tuple(cfg.patch_size)[0] != 1:
        raise ModelFamilyError(f"AnchorEdit treats each latent frame as one turn and needs a temporal patch size of 1; "
                               f"this transformer has patch_size={tuple(cfg.patch_size)}")


def get_runtime(transformer) -> AnchorEditRuntime | None:
    """The runtime installed by :func:`apply_anchoredit`, or None."""
    return getattr(_unwrap(transformer), _ATTR, None)


def apply_anchoredit(transformer, config: AnchorEditConfig | None = None) -> AnchorEditRuntime:
    """Install AnchorEdit on ``transformer`` (in place); return its :class:`AnchorEditRuntime`.

    Raises :class:`~diffusers_ext.errors.ModelFamilyError` for a transformer that is not a T2V Wan, and
    :class:`~diffusers_ext.errors.EditSteerConfigError` when ``config.max_turns`` does not fit its RoPE table or
    AnchorEdit is already installed (``remove_anchoredit`` first). On error the transformer is unchanged.
    """
    transformer = _unwrap(transformer)
    config = config or AnchorEditConfig()
    if not isinstance(config, AnchorEditConfig):
        raise EditSteerConfigError(f"config must be an AnchorEditConfig, got {type(config).__name__}")
    _check_family(transformer)
    if get_runtime(transformer) is not None:
        raise EditSteerConfigError("AnchorEdit is already applied to this transformer; call remove_anchoredit() "
                                   "first to change its config")
    config.check_rope(transformer.config.rope_max_seq_len)

    runtime = AnchorEditRuntime(config, len(transformer.blocks), transformer.config.patch_size,
                                transformer.config.rope_max_seq_len)
    for i, block in enumerate(transformer.blocks):
        runtime.original_processors[f"blocks.{i}.attn1"] = block.attn1.processor
        runtime.original_processors[f"blocks.{i}.attn2"] = block.attn2.processor
    for i, block in enumerate(transformer.blocks):
        self_proc = AnchorEditSelfAttnProcessor(runtime, i)
        self_proc._attention_backend = getattr(block.attn1.processor, "_attention_backend", None)
        block.attn1.set_processor(self_proc)
        block.attn2.set_processor(AnchorEditCrossAttnProcessor(runtime, block.attn2.processor))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(TransformerHook(runtime), TRANSFORMER_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer.rope).register_hook(RopeHook(runtime), ROPE_HOOK)
    setattr(transformer, _ATTR, runtime)
    return runtime


def _remove_hook(module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:  # leave no trace: drop the empty registry and the forward it pinned on the instance
        del module._diffusers_hook
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward:
            del module.forward


def remove_anchoredit(transformer) -> bool:
    """Undo :func:`apply_anchoredit`: the original processor objects and forward come back. Returns False if
    AnchorEdit was not applied."""
    transformer = _unwrap(transformer)
    runtime = get_runtime(transformer)
    if runtime is None:
        return False
    for i, block in enumerate(transformer.blocks):
        block.attn1.set_processor(runtime.original_processors[f"blocks.{i}.attn1"])
        block.attn2.set_processor(runtime.original_processors[f"blocks.{i}.attn2"])
    _remove_hook(transformer, TRANSFORMER_HOOK)
    _remove_hook(transformer.rope, ROPE_HOOK)
    delattr(transformer, _ATTR)
    return True


def anchoredit_forward(transformer, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       *, cache: AnchorKVCache | None = None, write: bool = False) -> torch.Tensor:
    """One call of an AnchorEdit transformer; returns the flow prediction ``[B, C, F, H, W]``.

    ``latents`` ``[B, C, F, H, W]``: frames = turns. ``timestep``: ``[B]`` (shared) or ``[B, F]`` (per frame), in
    0..1000. ``encoder_hidden_states``: ``[B, F, L, D]`` (one instruction per frame) or ``[B, L, D]`` (shared).
    Without ``cache`` all ``F`` frames run at once with frame-causal attention (training). With ``cache``, ``F`` must
    be 1: the frame attends to the cached sink/window frames; ``write=True`` keeps its keys/values afterwards (use it
    for the clean prediction of a finished turn).
    """
    if get_runtime(transformer) is None:
        raise EditSteerConfigError("anchoredit_forward needs apply_anchoredit(transformer, config) first")
    akw = {}
    if cache is not None:
        akw[CACHE_KWARG] = cache
    if write:
        akw[WRITE_KWARG] = True
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                       attention_kwargs=akw or None, return_dict=False)[0]


__all__ = ["ROPE_HOOK", "TRANSFORMER_HOOK", "anchoredit_forward", "apply_anchoredit", "get_runtime",
           "remove_anchoredit"]

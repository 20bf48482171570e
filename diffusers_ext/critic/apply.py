"""Install an Inline Critic on a diffusers transformer without forking model code, and take it off again.

``apply_inline_critic(transformer, critic)`` swaps every block's attention processor for a critic-aware one that
keeps the original (and calls it when the critic is off) and registers four kinds of torch hooks: a transformer
pre-hook (appends the critic rows), a transformer post-hook (collects the error map), a pre-hook on block ``l_in``
(writes the learned tokens into the critic rows) and a post-hook on each critique block ``l_c`` (runs the critique
head). ``remove_inline_critic(transformer)`` removes the hooks and puts the very same processor objects back.

Example::

    from diffusers_ext.critic import apply_inline_critic, remove_inline_critic, InlineCritic
    critic = InlineCritic.from_pretrained("toy-critic")
    handle = apply_inline_critic(pipe.transformer, critic, mode="steer")
    with handle.session(mode="critique") as records:       # per-call mode; records the error maps
        pipe(image=image, prompt="make the red circle blue", ...)
    records[-1].error_map.shape                             # (batch, h_tokens, w_tokens)
    remove_inline_critic(pipe.transformer)                  # the transformer is exactly as before
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager

import torch

from ..errors import EditSteerConfigError, EditSteerError, ModelFamilyError
from . import core, processors_flux, processors_qwen
from .config import CriticConfig, check_mode
from .module import InlineCritic
from .runtime import BoundArgs, CriticRuntime, Record

FAMILIES = (processors_flux, processors_qwen)
_PROCESSORS = {processors_flux.ARCH: processors_flux.FluxCriticAttnProcessor,
               processors_qwen.ARCH: processors_qwen.QwenCriticAttnProcessor}
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, InstalledCritic]" = weakref.WeakKeyDictionary()


def family_of(transformer):
    """The adapter module (``processors_flux`` / ``processors_qwen``) for ``transformer``."""
    for fam in FAMILIES:
        if fam.matches(transformer):
            return fam
    raise ModelFamilyError(
        f"the Inline Critic supports FluxTransformer2DModel (FLUX.1 Kontext) and QwenImageTransformer2DModel "
        f"(Qwen-Image-Edit); got {type(transformer).__name__}")


def describe_transformer(transformer) -> dict:
    """Family, width, depth, heads (and Flux's double-block count) of a supported transformer."""
    return family_of(transformer).describe(transformer)


def critic_config_for(transformer, **overrides) -> CriticConfig:
    """A :class:`CriticConfig` matching ``transformer``'s family and size, with the given overrides.

    Example::

        cfg = critic_config_for(pipe.transformer, l_in=2, l_c=(4,), mode="steer")
    """
    d = describe_transformer(transformer)
    base = {"arch": d["arch"], "width": d["width"], "depth": d["depth"], "num_heads": d["num_heads"],
            "num_double": d["num_double"], "context_dim": d["context_dim"]}
    base.update(overrides)
    return CriticConfig(**base)


def _check_scale(scale) -> float:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise EditSteerConfigError(f"critic scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


class InstalledCritic:
    """Handle of a critic installed on a transformer: switch modes, record error maps, remove it."""

    def __init__(self, transformer, critic: InlineCritic, family, mode: str, scale: float):
        self.transformer = transformer
        self.critic = critic
        self.family = family
        self.runtime = CriticRuntime(critic, family, mode, scale)
        #: Mode and scale that the pipeline which loaded this critic (``load_critic``) runs it in; the handle itself
        #: rests in ``off`` between that pipeline's calls. Pipelines built later on the same transformer without a
        #: critic of their own (``from_pipe``) start from them. ``None``: installed without a pipeline.
        self.pipeline_mode: str | None = None
        self.pipeline_scale: float | None = None
        self._originals: list[tuple[torch.nn.Module, object]] = []
        self._handles: list = []

    @property
    def mode(self) -> str:
        return self.runtime.mode

    @property
    def scale(self) -> float:
        return self.runtime.scale

    def set_mode(self, mode: str | None = None, scale: float | None = None) -> None:
        """Change the run mode (``off`` / ``critique`` / ``steer``) and/or the steer scale."""
        if mode is not None:
            self.runtime.mode = check_mode(mode)
        if scale is not None:
            self.runtime.scale = _check_scale(scale)

    @contextmanager
    def session(self, mode: str | None = None, scale: float | None = None):
        """Temporarily set mode/scale and record every forward (``list[Record]``: timestep, error map, mode)."""
        old = (self.runtime.mode, self.runtime.scale, self.runtime.recording)
        self.set_mode(mode, scale)
        records: list[Record] = []
        self.runtime.recording = records
        try:
            yield records
        finally:
            self.runtime.mode, self.runtime.scale, self.runtime.recording = old

    @property
    def last_call(self):
        """The :class:`~diffusers_ext.critic.runtime.CallState` of the latest forward (error maps with grad)."""
        return self.runtime.call

    # -- install / remove ---------------------------------------------------------------------------------------
    def _install(self) -> None:
        fam, rt, cfg = self.family, self.runtime, self.critic.config
        proc_cls = _PROCESSORS[fam.ARCH]
        blocks = fam.blocks(self.transformer)
        for i, block in enumerate(blocks):
            orig = block.attn.processor
            self._originals.append((block.attn, orig))
            block.attn.set_processor(proc_cls(rt, i, orig))
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(
            lambda m, a, k: fam.prepare_call(rt, m, a, k), with_kwargs=True))
        self._handles.append(t.register_forward_hook(lambda m, a, o: rt.finish_call()))
        self._handles.append(blocks[cfg.l_in].register_forward_pre_hook(_reset_rows_hook(rt), with_kwargs=True))
        for l in cfg.l_c:
            self._handles.append(blocks[l].register_forward_hook(_critique_hook(rt, l)))

    def remove(self) -> None:
        """Remove the hooks and restore every original processor object (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn, orig in reversed(self._originals):
            attn.set_processor(orig)
        self._originals.clear()
        self.runtime.call = None
        if _INSTALLED.get(self.transformer) is self:
            del _INSTALLED[self.transformer]

    def __repr__(self) -> str:
        return f"InstalledCritic({type(self.transformer).__name__}, mode={self.mode!r}, scale={self.scale})"


def _reset_rows_hook(rt: CriticRuntime):
    def hook(module, args, kwargs):
        call = rt.call
        if call is None or not call.active:
            return None
        b = BoundArgs(module, args, kwargs)
        ehs = b.get("encoder_hidden_states")
        rows = rt.critic.token_rows(ehs.shape[0], ehs.dtype, ehs.device)
        b.set("encoder_hidden_states", core.replace_rows(ehs, rows, call.n_txt))
        return b.unbind()

    return hook


def _critique_hook(rt: CriticRuntime, block: int):
    def hook(module, args, output):
        call = rt.call
        if call is None or not call.active:
            return None
        txt, img = rt.family.block_outputs(output)
        n_c = rt.critic.config.n_tokens
        call.maps[block] = rt.critic.critique(block, img[:, :call.n_target], txt[:, call.n_txt:call.n_txt + n_c])
        return None

    return hook


def installed_critic(transformer) -> InstalledCritic | None:
    """The handle of the critic installed on ``transformer``, or None."""
    return _INSTALLED.get(transformer)


def apply_inline_critic(transformer, critic, mode: str | None = None, scale: float | None = None) -> InstalledCritic:
    """Install ``critic`` (an :class:`InlineCritic`, a folder, a ``.safetensors`` file, a manifest id or a Hub
    repo id) on a ``FluxTransformer2DModel`` or ``QwenImageTransformer2DModel``.

    ``mode`` defaults to the critic's configured mode, ``scale`` to its ``steer_scale``. Everything is checked
    before anything is changed: a critic for another family or size raises :class:`ModelFamilyError`, a bad
    mode/scale or non-stock attention processors raise :class:`EditSteerConfigError`, and the transformer is left
    exactly as it was.

    Example::

        handle = apply_inline_critic(pipe.transformer, "toy-critic", mode="steer")
    """
    critic = InlineCritic.from_pretrained(critic)
    fam = family_of(transformer)
    critic.check_compatible(fam.describe(transformer))
    if transformer in _INSTALLED:
        raise EditSteerError("an Inline Critic is already installed on this transformer; call "
                             "remove_inline_critic(transformer) first (or use handle.set_mode to switch modes)")
    mode = check_mode(critic.config.mode if mode is None else mode)
    scale = _check_scale(critic.config.steer_scale if scale is None else scale)
    stock = fam._stock_processor_classes()
    for i, block in enumerate(fam.blocks(transformer)):
        p = block.attn.processor
        if not isinstance(p, stock):
            raise EditSteerConfigError(
                f"block {i} uses the attention processor {type(p).__name__}; the Inline Critic needs the stock "
                f"{stock[0].__name__} (remove IP-Adapters or custom processors first)")
    handle = InstalledCritic(transformer, critic, fam, mode, scale)
    try:
        handle._install()
        param = next(transformer.parameters(), None)
        if param is not None:
            critic.to(param.device)
    except BaseException:
        handle.remove()
        raise
    _INSTALLED[transformer] = handle
    return handle


def remove_inline_critic(transformer) -> bool:
    """Remove the installed critic (hooks off, original processor objects back). Returns False if none was."""
    handle = _INSTALLED.get(transformer)
    if handle is None:
        return False
    handle.remove()
    return True

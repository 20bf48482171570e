"""State shared by the hooks and attention processors of one installed critic (diffusers side)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .config import check_mode


@dataclass
class CallState:
    """What one transformer forward needs to know about the critic rows, set by the transformer pre-hook."""

    active: bool
    mode: str = "off"
    scale: float = 1.0
    n_txt: int = 0  # text rows without the critic (the critic rows start here in the joint sequence)
    n_target: int = 0  # image tokens being denoised (Kontext/Qwen-Edit condition tokens follow them)
    grid: tuple[int, int] | None = None  # (h, w) token grid of the target tokens
    timestep: float | None = None
    critic_pos: torch.Tensor | None = None  # Qwen: (B,) text RoPE row of the first critic token, when padded
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, n_target) critique, with grad

    def error_map(self) -> torch.Tensor | None:
        """Mean of the critique heads' maps: ``(B, n_target)`` (differentiable), or None."""
        if not self.maps:
            return None
        return torch.stack(list(self.maps.values())).mean(0)


@dataclass
class Record:
    """One transformer forward seen by a recording session."""

    timestep: float | None
    error_map: torch.Tensor | None  # (B, h, w) float32, detached, on CPU
    mode: str


class CriticRuntime:
    """Mode, scale and per-call state of an installed critic; records maps for pipelines."""

    def __init__(self, critic, family, mode: str, scale: float):
        self.critic = critic
        self.family = family
        self.mode = check_mode(mode)
        self.scale = float(scale)
        self.call: CallState | None = None
        self.recording: list[Record] | None = None

    def sync_device(self, device) -> None:
        """Follow the transformer (``pipe.to``, CPU offload): move the critic where the activations are."""
        if self.critic.tokens.device != torch.device(device):
            self.critic.to(device)

    def finish_call(self) -> None:
        call = self.call
        if call is None or not call.active or self.recording is None:
            return
        m = call.error_map()
        if m is not None:
            m = m.detach().float().cpu()
            if call.grid is not None and call.grid[0] * call.grid[1] == m.shape[1]:
                m = m.reshape(m.shape[0], *call.grid)
        self.recording.append(Record(call.timestep, m, call.mode))


class CriticProcessorBase:
    """What every family's critic attention processor shares: the runtime, its block index, the block's original
    processor (called whenever the critic is off, so ``off`` is the stock computation) and the attention kernel
    handed to :meth:`InlineCritic.attention`, diffusers' ``dispatch_attention_fn`` with the original processor's
    backend. Not an ``nn.Module``: the critic's parameters live in one :class:`InlineCritic` (shared by every
    block, FSDP-friendly, kept out of the transformer's ``state_dict``)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, runtime: CriticRuntime, block_index: int, original):
        self.runtime = runtime
        self.block_index = block_index
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _attn(self, q, k, v, mask):
        """``core.AttnFn`` on ``BSHD`` tensors; ``mask`` is a key mask or key bias ``(B | 1, S_k)``."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        m = None if mask is None else mask[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=m, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)


class BoundArgs:
    """A call's ``(args, kwargs)`` addressed by parameter name, edited in place of where each value was passed
    (positional stays positional, keyword stays keyword: decorators such as diffusers' ``apply_lora_scale`` read
    their argument from ``kwargs``)."""

    _names: dict = {}

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        fn = type(module).forward
        names = self._names.get(fn)
        if names is None:
            params = list(inspect.signature(fn).parameters.values())[1:]  # drop self
            names = self._names[fn] = [p.name for p in params
                                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.names = names
        self.args = list(args)
        self.kwargs = dict(kwargs)

    def _pos(self, name):
        try:
            i = self.names.index(name)
        except ValueError:
            return None
        return i if i < len(self.args) else None

    def get(self, name, default=None):
        if name in self.kwargs:
            return self.kwargs[name]
        i = self._pos(name)
        return self.args[i] if i is not None else default

    def set(self, name, value) -> None:
        i = None if name in self.kwargs else self._pos(name)
        if i is not None:
            self.args[i] = value
        else:
            self.kwargs[name] = value

    def unbind(self) -> tuple[tuple, dict]:
        return tuple(self.args), self.kwargs

"""Read a frozen transformer's intermediate image-stream states (for the probe diagnostic and stage 1).

``capture_blocks(transformer, n_target)`` records, for every block, the image-stream hidden states of the first
``n_target`` tokens (the tokens being denoised) at the block's output, and the timestep embedding ``temb`` that the
final ``norm_out`` uses. ``logit_lens(transformer, h, temb)`` applies the model's own ``norm_out`` + ``proj_out`` to
any of them: the zero-training read-out; for the last block it *is* the model output.

Example::

    with capture_blocks(pipe.transformer, n_target=16) as tap:
        out = pipe.transformer(**inputs)[0]
    v_l = logit_lens(pipe.transformer, tap.hidden[3], tap.temb)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .apply import family_of
from .runtime import BoundArgs


@dataclass
class Tap:
    n_target: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, n_target, W)
    temb: torch.Tensor | None = None  # (B, W) as norm_out receives it


@contextmanager
def capture_blocks(transformer, n_target: int, blocks: list[int] | None = None, detach: bool = True):
    """Record the image-stream output of ``blocks`` (default: all) for the first ``n_target`` tokens, and temb."""
    fam = family_of(transformer)
    all_blocks = fam.blocks(transformer)
    which = range(len(all_blocks)) if blocks is None else blocks
    tap = Tap(n_target)
    zero_cond = bool(getattr(transformer.config, "zero_cond_t", False))
    handles = []

    def temb_hook(module, args, kwargs):
        t = BoundArgs(module, args, kwargs).get("temb")
        if zero_cond:  # Qwen 2511-style: temb is doubled for the reference tokens; norm_out uses the first half
            t = t.chunk(2, dim=0)[0]
        tap.temb = t.detach() if detach else t

    def out_hook(i):
        def hook(module, args, output):
            _, img = fam.block_outputs(output)
            h = img[:, :n_target]
            tap.hidden[i] = h.detach() if detach else h
        return hook

    try:
        handles.append(all_blocks[0].register_forward_pre_hook(temb_hook, with_kwargs=True))
        for i in which:
            handles.append(all_blocks[i].register_forward_hook(out_hook(i)))
        yield tap
    finally:
        for h in handles:
            h.remove()


def logit_lens(transformer, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The model's own output head on an intermediate state: ``proj_out(norm_out(h, temb))``."""
    return transformer.proj_out(transformer.norm_out(h, temb))

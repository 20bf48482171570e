"""The anchored KV cache: sink frames that are never evicted plus a sliding window of recent turns.

One :class:`AnchorKVCache` serves every self-attention layer of one session. Each layer owns a key buffer and a
value buffer of ``slots x tokens_per_frame`` rows; a *slot* holds the keys/values of one frame (one turn), rotated
with that frame's absolute temporal RoPE before they were stored (as the official code does). One extra slot, the
*scratch* slot, receives the frame being denoised: attention of the current frame runs over the filled slots plus
the scratch slot, with no copy and no mask (attention is invariant to the order of keys).

``commit()`` turns the scratch slot into a kept frame (the clean prediction of a finished turn, written back by one
transformer pass at ``context_timestep``); when more than ``window`` non-sink frames are kept, the oldest one is
evicted and its slot becomes the new scratch slot. So memory grows by one slot per turn until the window is full and
then stays flat: ``(sink + window + 1)`` slots per layer, plus ``undo_depth`` evicted frames kept for exact undo.

Example::

    from diffusers_ext.anchoredit import AnchorEditConfig, AnchorKVCache
    cache = AnchorKVCache(AnchorEditConfig(sink=1, window=4), num_layers=40)
    # used through anchoredit_forward(transformer, ..., cache=cache, write=True/False)
    cache.frames, cache.next_frame, cache.nbytes()
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import EditSteerConfigError, EditSteerError
from .config import AnchorEditConfig


@dataclass
class _WriteRecord:
    frame: int
    slot: int
    evicted_frame: int | None = None
    evicted_slot: int | None = None
    evicted_k: list[torch.Tensor] | None = None  # per layer; None when not kept (beyond undo_depth)
    evicted_v: list[torch.Tensor] | None = None

    @property
    def undoable(self) -> bool:
        return self.evicted_frame is None or self.evicted_k is not None


@dataclass
class _Layout:
    batch: int
    tokens: int  # tokens per frame
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def describe(self) -> str:
        return (f"batch {self.batch}, {self.tokens} tokens/frame, {self.heads} heads x {self.head_dim}, "
                f"{self.dtype}, {self.device}")


class AnchorKVCache:
    """Sink + sliding-window KV cache shared by all self-attention layers of a causal Wan (see module docstring)."""

    def __init__(self, config: AnchorEditConfig, num_layers: int):
        if num_layers < 1:
            raise EditSteerConfigError(f"AnchorKVCache needs num_layers >= 1, got {num_layers}")
        self.config = config
        self.num_layers = int(num_layers)
        self.reset()

    # ------------------------------------------------------------------------------------------------------------
    # state

    def reset(self) -> None:
        """Forget everything (frees the buffers)."""
        self._k: list[torch.Tensor | None] = [None] * self.num_layers
        self._v: list[torch.Tensor | None] = [None] * self.num_layers
        self._layout: _Layout | None = None
        self.slot_frame: list[int | None] = []  # frame index held by each allocated slot (None: free / scratch)
        self.scratch = 0
        self.num_frames = 0
        self._records: list[_WriteRecord] = []
        self._staged: set[int] = set()

    @property
    def next_frame(self) -> int:
        """Absolute index of the frame the next forward pass processes (its RoPE position is this x stride)."""
        return self.num_frames

    @property
    def frames(self) -> list[int]:
        """Indices of the frames whose keys/values are kept, ascending."""
        return sorted(f for f in self.slot_frame if f is not None)

    @property
    def capacity(self) -> int:
        """Allocated slots per layer (kept frames + the scratch slot)."""
        return len(self.slot_frame)

    @property
    def layout(self) -> _Layout | None:
        return self._layout

    def _used_slots(self) -> int:
        return sum(f is not None for f in self.slot_frame) + 1

    # ------------------------------------------------------------------------------------------------------------
    # attention interface (called by the self-attention processor of each layer)

    def stage(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the current frame's ``key``/``value`` ([B, n, H, D], RoPE applied) in the scratch slot of ``layer``
        and return the keys/values the current frame attends to: every kept frame plus itself."""
        self._ensure_layout(key)
        self._ensure_slot(self.scratch)
        n = self._layout.tokens
        s = self.scratch
        kb, vb = self._k[layer], self._v[layer]
        kb[:, s * n:(s + 1) * n] = key.detach()
        vb[:, s * n:(s + 1) * n] = value.detach()
        self._staged.add(layer)
        used = self._used_slots() * n
        if not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            return kb[:, :used], vb[:, :used]
        # differentiable path (stage-3 training): kept frames are constants, the current frame carries gradients
        parts_k = [kb[:, :s * n], key, kb[:, (s + 1) * n:used]]
        parts_v = [vb[:, :s * n], value, vb[:, (s + 1) * n:used]]
        return torch.cat(parts_k, 1), torch.cat(parts_v, 1)

    def commit(self) -> int:
        """Keep the frame staged by the last forward pass (all layers); evict beyond the window; return its index."""
        if self._layout is None or len(self._staged) != self.num_layers:
            raise EditSteerError(f"AnchorKVCache.commit: the last forward staged {len(self._staged)} of "
                                 f"{self.num_layers} layers; write a frame with anchoredit_forward(..., write=True)")
        frame, slot = self.num_frames, self.scratch
        self.slot_frame[slot] = frame
        self.num_frames += 1
        self._staged.clear()
        rec = _WriteRecord(frame=frame, slot=slot)
        cfg = self.config
        kept = [f for f in self.slot_frame if f is not None and f >= cfg.sink]
        if cfg.window is not None and len(kept) > cfg.window:
            victim = min(kept)
            vslot = self.slot_frame.index(victim)
            rec.evicted_frame, rec.evicted_slot = victim, vslot
            if cfg.undo_depth > 0:
                n = self._layout.tokens
                rec.evicted_k = [k[:, vslot * n:(vslot + 1) * n].clone() for k in self._k]
                rec.evicted_v = [v[:, vslot * n:(vslot + 1) * n].clone() for v in self._v]
            self.slot_frame[vslot] = None
            self.scratch = vslot
        else:
            self.scratch = self._used_slots() - 1  # the first slot after the kept ones
        self._ensure_slot(self.scratch)  # allocate now: a later (possibly failing) pass only writes the scratch slot
        self._records.append(rec)
        self._trim_records()
        return frame

    def _trim_records(self) -> None:
        seen = 0
        for rec in reversed(self._records):
            if rec.evicted_k is not None:
                seen += 1
                if seen > self.config.undo_depth:
                    rec.evicted_k = rec.evicted_v = None  # too old to restore instantly

    # ------------------------------------------------------------------------------------------------------------
    # undo

    def can_pop(self, count: int = 1) -> bool:
        """True when the last ``count`` written frames can be removed exactly without recomputation."""
        if count > len(self._records):
            return False
        return all(r.undoable for r in self._records[len(self._records) - count:])

    def pop(self) -> int:
        """Remove the last written frame (restoring the frame it evicted, if any); return its index."""
        if not self.can_pop(1):
            raise EditSteerError("AnchorKVCache.pop: the last write evicted a frame that is no longer kept "
                                 "(raise undo_depth); rebuild the cache from the session's latents instead")
        rec = self._records.pop()
        self.slot_frame[rec.slot] = None
        if rec.evicted_frame is not None:
            n = self._layout.tokens
            s = rec.evicted_slot
            for layer in range(self.num_layers):
                self._k[layer][:, s * n:(s + 1) * n] = rec.evicted_k[layer]
                self._v[layer][:, s * n:(s + 1) * n] = rec.evicted_v[layer]
            self.slot_frame[s] = rec.evicted_frame
        self.scratch = rec.slot
        self.num_frames -= 1
        self._staged.clear()
        return rec.frame

    def truncate(self, num_frames: int) -> bool:
        """Keep only frames ``< num_frames`` if that can be done exactly; return False (unchanged) otherwise."""
        drop = self.num_frames - int(num_frames)
        if drop < 0:
            raise EditSteerConfigError(f"cannot truncate a cache of {self.num_frames} frames to {num_frames}")
        if drop == 0:
            return True
        if not self.can_pop(drop):
            return False
        for _ in range(drop):
            self.pop()
        return True

    # ------------------------------------------------------------------------------------------------------------
    # memory

    def nbytes(self) -> int:
        """Bytes held: allocated key/value buffers plus the evicted frames kept for undo."""
        total = sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)
        for r in self._records:
            if r.evicted_k is not None:
                total += sum(t.numel() * t.element_size() for t in (*r.evicted_k, *r.evicted_v))
        return total

    def nbytes_kept(self) -> int:
        """Bytes of the kept frames only (what attention reads, without the scratch slot and undo copies)."""
        if self._layout is None:
            return 0
        per_slot = sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None) // self.capacity
        return per_slot * len(self.frames)

    # ------------------------------------------------------------------------------------------------------------
    # allocation

    def _ensure_layout(self, key: torch.Tensor) -> None:
        b, n, h, d = key.shape
        lay = _Layout(b, n, h, d, key.dtype, key.device)
        if self._layout is None:
            self._layout = lay
            return
        if (self._layout.batch, self._layout.tokens, self._layout.heads, self._layout.head_dim) != (b, n, h, d):
            raise EditSteerConfigError(
                f"this KV cache holds frames of {self._layout.describe()}; the current frame has {lay.describe()}. "
                "Every turn of a session must have the source's size and batch (CFG doubles the batch); start a new "
                "session for a different image size.")
        if self._layout.dtype != key.dtype or self._layout.device != key.device:
            self.to(device=key.device, dtype=key.dtype)

    def _ensure_slot(self, slot: int) -> None:
        while slot >= self.capacity:
            lay = self._layout
            cap = self.capacity + 1
            if self.config.cache_frames is not None and cap > self.config.cache_frames + 1:  # pragma: no cover
                raise EditSteerError("AnchorKVCache: internal slot accounting error")
            for i in range(self.num_layers):
                for bufs in (self._k, self._v):
                    new = torch.zeros(lay.batch, cap * lay.tokens, lay.heads, lay.head_dim, dtype=lay.dtype,
                                      device=lay.device)
                    if bufs[i] is not None:
                        new[:, :bufs[i].shape[1]] = bufs[i]
                    bufs[i] = new
            self.slot_frame.append(None)

    def to(self, device=None, dtype=None) -> "AnchorKVCache":
        """Move the buffers (e.g. offload a paused session to the CPU)."""
        def mv(t):
            return None if t is None else t.to(device=device or t.device, dtype=dtype or t.dtype)

        self._k = [mv(t) for t in self._k]
        self._v = [mv(t) for t in self._v]
        for r in self._records:
            if r.evicted_k is not None:
                r.evicted_k = [mv(t) for t in r.evicted_k]
                r.evicted_v = [mv(t) for t in r.evicted_v]
        if self._layout is not None:
            self._layout.device = torch.device(device) if device is not None else self._layout.device
            self._layout.dtype = dtype or self._layout.dtype
        return self

    def clone(self) -> "AnchorKVCache":
        """An independent copy (tensors copied): a forked session edits without touching this one."""
        new = copy.copy(self)
        new._k = [None if t is None else t.clone() for t in self._k]
        new._v = [None if t is None else t.clone() for t in self._v]
        new._layout = copy.copy(self._layout)
        new.slot_frame = list(self.slot_frame)
        new._records = [copy.copy(r) for r in self._records]
        for r in new._records:
            if r.evicted_k is not None:
                r.evicted_k = [t.clone() for t in r.evicted_k]
                r.evicted_v = [t.clone() for t in r.evicted_v]
        new._staged = set()
        return new

    # ------------------------------------------------------------------------------------------------------------
    # persistence (session save/load): tensors for safetensors, the rest as JSON-able metadata

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"num_layers": self.num_layers, "num_frames": self.num_frames, "scratch": self.scratch,
                      "slot_frame": list(self.slot_frame), "config": self.config.to_dict(), "records": []}
        if self._layout is not None:
            lay = self._layout
            meta["layout"] = {"batch": lay.batch, "tokens": lay.tokens, "heads": lay.heads,
                              "head_dim": lay.head_dim, "dtype": str(lay.dtype).replace("torch.", "")}
            n, s = lay.tokens, self.scratch
            for i in range(self.num_layers):
                for name, buf in (("k", self._k[i]), ("v", self._v[i])):
                    t = buf.clone()
                    t[:, s * n:(s + 1) * n] = 0  # the scratch slot holds no kept frame
                    tensors[f"cache.{name}.{i}"] = t
        for j, r in enumerate(self._records):
            meta["records"].append({"frame": r.frame, "slot": r.slot, "evicted_frame": r.evicted_frame,
                                    "evicted_slot": r.evicted_slot, "kept": r.evicted_k is not None})
            if r.evicted_k is not None:
                for i in range(self.num_layers):
                    tensors[f"cache.undo.{j}.k.{i}"] = r.evicted_k[i].contiguous()
                    tensors[f"cache.undo.{j}.v.{i}"] = r.evicted_v[i].contiguous()
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict, device=None) -> "AnchorKVCache":
        cache = cls(AnchorEditConfig.from_dict(meta["config"]), meta["num_layers"])
        cache.num_frames = int(meta["num_frames"])
        cache.scratch = int(meta["scratch"])
        cache.slot_frame = list(meta["slot_frame"])
        lay = meta.get("layout")
        if lay is not None:
            first = tensors["cache.k.0"]
            cache._layout = _Layout(lay["batch"], lay["tokens"], lay["heads"], lay["head_dim"], first.dtype,
                                    torch.device(device) if device is not None else first.device)
            cache._k = [tensors[f"cache.k.{i}"].to(cache._layout.device) for i in range(cache.num_layers)]
            cache._v = [tensors[f"cache.v.{i}"].to(cache._layout.device) for i in range(cache.num_layers)]
        for j, r in enumerate(meta["records"]):
            rec = _WriteRecord(r["frame"], r["slot"], r["evicted_frame"], r["evicted_slot"])
            if r["kept"]:
                rec.evicted_k = [tensors[f"cache.undo.{j}.k.{i}"] for i in range(cache.num_layers)]
                rec.evicted_v = [tensors[f"cache.undo.{j}.v.{i}"] for i in range(cache.num_layers)]
            cache._records.append(rec)
        return cache

    def __repr__(self) -> str:
        return (f"AnchorKVCache(frames={self.frames}, next_frame={self.next_frame}, slots={self.capacity}, "
                f"sink={self.config.sink}, window={self.config.window}, {self.nbytes() / 2**20:.2f} MiB)")


__all__ = ["AnchorKVCache"]

"""Validated settings of AnchorEdit: the causal memory (:class:`AnchorEditConfig`) and the per-turn sampler
(:class:`SamplerConfig`).

Every value is checked in ``__post_init__``; a bad value raises
:class:`~diffusers_ext.errors.EditSteerConfigError` that names the field, what was wrong and what to use.

Example::

    from diffusers_ext.anchoredit import AnchorEditConfig, SamplerConfig
    memory = AnchorEditConfig(sink=1, window=4, rope_stride=4, max_turns=16)
    sampler = SamplerConfig.distilled()          # 4 steps [1000, 750, 500, 250], re-noising, no CFG
    teacher = SamplerConfig.flow(steps=50)       # many-step Euler flow sampler for undistilled (stage-2) weights
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import EditSteerConfigError

#: Per-turn seed stride of the official inference (``seed + 7919 * turn``).
SEED_STRIDE = 7919
DISTILLED_TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)
NEGATIVE_PROMPT = "low quality, blurry, distorted"


def _bad(cls: str, name: str, msg: str):
    raise EditSteerConfigError(f"{cls}.{name}: {msg}")


@dataclass(frozen=True)
class AnchorEditConfig:
    """How the Wan transformer becomes a causal, turn-by-turn editor with an anchored memory.

    Args:
        sink: number of first frames that are never evicted from the KV cache. Frame 0 is the source image, so
            ``sink=1`` anchors the source (AnchorEdit's memory); ``sink=0`` is the no-anchor ablation.
        window: number of most recent turns (after the sink) whose keys/values stay in the cache. ``None`` keeps
            every turn (the official released configs: full cache, memory grows with turns).
        rope_stride: temporal RoPE distance between consecutive turns (official: 4). Frame ``i`` has temporal
            position ``i * rope_stride``; keys are rotated before caching (absolute positions, as the official code).
        max_turns: the longest session (edits after the source) a model accepts; positions up to
            ``max_turns * rope_stride`` must fit the transformer's RoPE table (``rope_max_seq_len``).
        context_timestep: timestep (0..1000) at which a finished turn's clean prediction is written back into the
            cache (official ``context_noise``: 0).
        undo_depth: how many recent evictions the cache keeps a copy of, so that ``undo`` of that many turns is
            exact and instant (older undos replay the kept latents). Costs ``undo_depth`` frames of cache memory.
        causal_attention: ``"auto"`` (a boolean mask for short sequences, a loop over frames for long ones),
            ``"mask"`` or ``"loop"``: how the full-sequence (training) forward realises frame-causal attention.
            All three give the same result; ``"loop"`` never builds an ``S x S`` mask and works with every
            attention backend.
    """

    sink: int = 1
    window: int | None = 4
    rope_stride: int = 4
    max_turns: int = 16
    context_timestep: float = 0.0
    undo_depth: int = 2
    causal_attention: str = "auto"

    def __post_init__(self):
        c = type(self).__name__
        for name in ("sink", "rope_stride", "max_turns", "undo_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                _bad(c, name, f"must be an integer, got {v!r}")
        if self.sink < 0:
            _bad(c, "sink", f"must be >= 0 (0 = no anchor, 1 = the source frame), got {self.sink}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 1):
            _bad(c, "window", f"must be an integer >= 1 or None (keep every turn), got {self.window!r}")
        if self.rope_stride < 1:
            _bad(c, "rope_stride", f"must be >= 1, got {self.rope_stride}")
        if self.max_turns < 1:
            _bad(c, "max_turns", f"must be >= 1, got {self.max_turns}")
        if not 0.0 <= float(self.context_timestep) <= 1000.0:
            _bad(c, "context_timestep", f"must be in [0, 1000], got {self.context_timestep}")
        if self.undo_depth < 0:
            _bad(c, "undo_depth", f"must be >= 0, got {self.undo_depth}")
        if self.causal_attention not in ("auto", "mask", "loop"):
            _bad(c, "causal_attention", f"must be 'auto', 'mask' or 'loop', got {self.causal_attention!r}")

    @property
    def max_frames(self) -> int:
        """Frames of the longest session: the source plus ``max_turns`` edits."""
        return self.max_turns + 1

    @property
    def cache_frames(self) -> int | None:
        """Frames the KV cache keeps after a turn is written (None: unbounded)."""
        return None if self.window is None else self.sink + self.window

    def visible_frames(self, i: int) -> list[int]:
        """Frames that frame ``i`` attends to (itself included): the sink, the last ``window`` turns, itself."""
        if self.window is None:
            return list(range(i + 1))
        sink = list(range(min(self.sink, i)))
        recent = list(range(max(self.sink, i - self.window), i))
        return sink + recent + [i]

    def check_rope(self, rope_max_seq_len: int) -> None:
        need = self.max_turns * self.rope_stride
        if need >= rope_max_seq_len:
            raise EditSteerConfigError(
                f"AnchorEditConfig: max_turns={self.max_turns} x rope_stride={self.rope_stride} = {need} temporal "
                f"positions, but the transformer's RoPE table has {rope_max_seq_len} (rope_max_seq_len). Lower "
                f"max_turns to at most {(rope_max_seq_len - 1) // self.rope_stride} or the stride.")

    def replace(self, **changes) -> "AnchorEditConfig":
        d = asdict(self)
        unknown = set(changes) - set(d)
        if unknown:
            raise EditSteerConfigError(f"AnchorEditConfig has no field(s) {sorted(unknown)}; fields: {sorted(d)}")
        d.update(changes)
        return AnchorEditConfig(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AnchorEditConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EditSteerConfigError(f"AnchorEditConfig: unknown field(s) {sorted(unknown)}; fields: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class SamplerConfig:
    """How one turn is denoised.

    ``kind="distilled"``: the 4-step schedule of the distilled (stage-3) model: at each timestep of ``timesteps``
    predict the clean latent x̂₀, then re-noise it with fresh noise to the next timestep (Self-Forcing style); the
    last x̂₀ is the turn's result. No CFG by default (official DMD inference: guidance 1.0).

    ``kind="flow"``: a many-step Euler flow-matching sampler (for undistilled stage-1/2 weights): ``steps`` sigmas
    ``linspace(1, 0)`` shifted by ``shift``, optional CFG with ``negative_prompt`` (official stage-2 validation:
    50 steps, shift 8, CFG 5).

    Turn ``i`` (1-based) draws its noise from ``torch.Generator().manual_seed(seed + 7919 * i)`` (official), so a
    session replays identically from its seed.
    """

    kind: str = "distilled"
    timesteps: tuple[float, ...] = DISTILLED_TIMESTEPS
    steps: int = 50
    shift: float = 8.0
    guidance_scale: float = 1.0
    negative_prompt: str = NEGATIVE_PROMPT
    seed_stride: int = SEED_STRIDE
    num_train_timesteps: int = 1000

    def __post_init__(self):
        c = type(self).__name__
        if self.kind not in ("distilled", "flow"):
            _bad(c, "kind", f"must be 'distilled' or 'flow', got {self.kind!r}")
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if self.kind == "distilled":
            ts = self.timesteps
            if not ts:
                _bad(c, "timesteps", "needs at least one timestep")
            if any(not 0 < t <= self.num_train_timesteps for t in ts):
                _bad(c, "timesteps", f"must lie in (0, {self.num_train_timesteps}], got {list(ts)}")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                _bad(c, "timesteps", f"must be strictly decreasing, got {list(ts)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            _bad(c, "steps", f"must be an integer >= 1, got {self.steps!r}")
        if not self.shift > 0:
            _bad(c, "shift", f"must be > 0, got {self.shift}")
        if not self.guidance_scale >= 1.0:
            _bad(c, "guidance_scale", f"must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        if not isinstance(self.seed_stride, int) or self.seed_stride < 1:
            _bad(c, "seed_stride", f"must be a positive integer, got {self.seed_stride!r}")

    @classmethod
    def distilled(cls, timesteps=DISTILLED_TIMESTEPS, **kw) -> "SamplerConfig":
        return cls(kind="distilled", timesteps=tuple(timesteps), **kw)

    @classmethod
    def flow(cls, steps: int = 50, shift: float = 8.0, guidance_scale: float = 5.0, **kw) -> "SamplerConfig":
        return cls(kind="flow", steps=steps, shift=shift, guidance_scale=guidance_scale, **kw)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def nfe_per_turn(self) -> int:
        """Transformer passes per turn: denoising steps (x2 with CFG) plus the cache write-back pass."""
        n = len(self.timesteps) if self.kind == "distilled" else self.steps
        return n * (2 if self.cfg else 1) + 1

    def turn_seed(self, seed: int, turn: int) -> int:
        return int(seed) + self.seed_stride * int(turn)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EditSteerConfigError(f"SamplerConfig: unknown field(s) {sorted(unknown)}; fields: {sorted(names)}")
        d = dict(d)
        if "timesteps" in d:
            d["timesteps"] = tuple(d["timesteps"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


__all__ = ["AnchorEditConfig", "SamplerConfig", "SEED_STRIDE", "DISTILLED_TIMESTEPS", "NEGATIVE_PROMPT"]

"""MLN settings: a validated dataclass and the presets.

Presets ``"512"`` and ``"1024"`` are the official code v2's (``AmirMaEl/MLN`` at 3824c21, ``methods/mln.py``), as
written down in EditSteer's ``methods.md`` section 4.4; they may be post-paper tuning. Preset ``"toy"`` is
EditSteer's own, for the 6-scale toy Switti (32 px): the in-mask schedule interpolated to K scales as the official
1024 preset's is, the rest tuned on 240 training-split toy cases with focus captions (``editsteer bench mln --split
train --set ...``): no copied scales (grids 1 and 2 hold a 32-px image's background colour, so copying them forbids
background edits), CFG 2 (at the official 8 a small toy object inside the mask rarely forms),
``refine_keep="mask_tv"`` (the toy's automatic mask often misses added or moved objects; official refinement then
erases them), ``anchor="residual"`` (with no copied scales an edit changes the 1x1 and 2x2 grids, over which the
source's fixed fine tokens no longer rebuild the source; its re-tokenised residual does), and beta 4 (the strongest
out-of-mask pull is no longer needed once the anchor is right; it costs edits).

Example::

    from diffusers_ext.mln import MLNConfig
    cfg = MLNConfig.preset("512")                       # official v2 defaults for Switti 512
    cfg = MLNConfig.preset("512", beta=8.0)             # one override
    cfg = MLNConfig.preset("512").neutral()             # beta = alpha = 0, s = 0, no refinement (plain sampling)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..errors import EditSteerConfigError

#: The official v2 in-mask nudging schedule at 512 px (10 scales): strong at coarse scales, fading at fine ones.
SMOOTH_512: tuple[float, ...] = (12.0, 11.5, 11.0, 10.0, 9.0, 8.0, 6.0, 3.0, 1.5, 0.5)


def interpolate_schedule(values, num_scales: int) -> tuple[float, ...]:
    """Resample a per-scale schedule to ``num_scales`` entries by linear interpolation over its index range
    (official v2 at 1024: ``interp(linspace(0, 9, 14), arange(10), SMOOTH)``)."""
    v = np.asarray(values, dtype=np.float64)
    x = np.linspace(0, len(v) - 1, num_scales)
    return tuple(float(a) for a in np.interp(x, np.arange(len(v)), v))


#: Where quantisation refinement restores the source (:attr:`MLNConfig.refine_keep`).
REFINE_KEEP = ("mask", "mask_tv")
#: What the nudge pulls toward (:attr:`MLNConfig.anchor`).
ANCHORS = ("tokens", "residual")


@dataclass(frozen=True)
class MLNConfig:
    """Masked Logit Nudging settings (``methods.md`` section 4.4). Scale indices are 0-based, K = ``num_scales``.

    Attributes:
        num_scales: K; must equal the model's number of scales.
        copy_scales: s; scales ``k < s`` take the source tokens verbatim.
        alphas: in-mask nudge strength per scale (K values).
        beta: out-of-mask nudge strength.
        gamma: exponent of the TV-adaptive weight; ``tv_adaptive=False`` uses weight 1 everywhere; ``tv_stop``:
            the weight applies on scales ``k < tv_stop`` only (None = every scale, official).
        cfg: guidance ``t = cfg * k / (K - 1)`` on scales ``cfg_start <= k < cfg_stop``, source prompt as negative.
        smooth_start: first scale sampled with soft Gumbel (while guidance is on); else top-k / top-p.
        last_temp, top_k, top_p: temperature and filtering on unguided scales (the last one by default).
        mask_quantile: q; the mask keeps tokens whose attention difference is above the q-quantile.
        mask_blocks: ``(first, stop)`` transformer blocks averaged for the mask; None = the official 3..26 of 30,
            scaled to the model's depth.
        mask_scale: scale whose cross-attention gives the mask; None = the last (official).
        mask_neighbours: tokens next to a changed token that also count (EditSteer's token choice).
        refine_steps, refine_tau, refine_tol: quantisation refinement outside the mask (0 steps = off).
        refine_keep: where refinement restores the source: ``"mask"`` outside the mask (official); ``"mask_tv"``
            outside the mask *and* where the finest TV-weighted scale kept the token anchored (EditSteer's: an
            automatic mask that misses the edit no longer erases what the TV weight let through outside it).
        anchor: what the nudge pulls toward: ``"tokens"`` the source's fixed tokens (official); ``"residual"`` the
            source re-tokenised over the prefix sampled so far (EditSteer's: once an edit changes a coarse scale, the
            source's fixed fine tokens, residuals over the source's own coarse scales, no longer add up to the
            source; its re-tokenised residual does).
        global_edit: mask everywhere, no refinement (style edits).
        reseed_every_scale: reseed the generator with the seed at every scale (official).
    """

    num_scales: int
    copy_scales: int
    alphas: tuple[float, ...]
    beta: float = 12.0
    gamma: float = 1.5
    tv_adaptive: bool = True
    tv_stop: int | None = None
    cfg: float = 8.0
    cfg_start: int = 0
    cfg_stop: int | None = None
    smooth_start: int = 2
    more_smooth: bool = True
    last_temp: float = 0.1
    top_k: int = 400
    top_p: float = 0.95
    mask_quantile: float = 0.80
    mask_blocks: tuple[int, int] | None = None
    mask_scale: int | None = None
    mask_neighbours: int = 1
    refine_steps: int = 5
    refine_tau: float = 0.2
    refine_tol: float = 1e-4
    refine_keep: str = "mask"
    anchor: str = "tokens"
    global_edit: bool = False
    reseed_every_scale: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        K = self.num_scales

        def bad(msg):
            raise EditSteerConfigError(f"MLNConfig: {msg}")

        if K < 2:
            bad(f"num_scales must be >= 2, got {K}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if len(self.alphas) != K:
            bad(f"alphas needs one value per scale ({K}), got {len(self.alphas)}")
        if not 0 <= self.copy_scales <= K:
            bad(f"copy_scales must be in [0, {K}], got {self.copy_scales}")
        if self.cfg_stop is None:
            object.__setattr__(self, "cfg_stop", K - 1)
        if not 0 <= self.cfg_start <= self.cfg_stop <= K:
            bad(f"need 0 <= cfg_start <= cfg_stop <= {K}, got {self.cfg_start}, {self.cfg_stop}")
        if min(self.alphas) < 0 or self.beta < 0 or self.cfg < 0 or self.gamma < 0:
            bad("alphas, beta, cfg and gamma must be >= 0")
        if not 0.0 <= self.mask_quantile < 1.0:
            bad(f"mask_quantile must be in [0, 1), got {self.mask_quantile}")
        if self.mask_scale is not None and not 0 < self.mask_scale < K:
            bad(f"mask_scale must be in [1, {K - 1}], got {self.mask_scale}")
        if self.mask_blocks is not None:
            a, b = self.mask_blocks
            if not 0 <= a < b:
                bad(f"mask_blocks must be (first, stop) with 0 <= first < stop, got {self.mask_blocks}")
            object.__setattr__(self, "mask_blocks", (int(a), int(b)))
        if self.refine_steps < 0 or self.refine_tau <= 0:
            bad("refine_steps must be >= 0 and refine_tau > 0")
        if self.refine_keep not in REFINE_KEEP:
            bad(f"refine_keep must be one of {REFINE_KEEP}, got {self.refine_keep!r}")
        if self.anchor not in ANCHORS:
            bad(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.last_temp <= 0 or self.top_k < 0 or not 0 <= self.top_p <= 1:
            bad("last_temp must be > 0, top_k >= 0, top_p in [0, 1]")
        if self.mask_neighbours < 0:
            bad("mask_neighbours must be >= 0")
        if self.tv_stop is not None and not 0 <= self.tv_stop <= K:
            bad(f"tv_stop must be in [0, {K}], got {self.tv_stop}")

    # -- presets -----------------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "MLNConfig":
        """``"512"`` / ``"1024"`` (official code v2) or ``"toy"`` (EditSteer's, 6 scales), with overrides."""
        name = str(name)
        if name not in PRESETS:
            raise EditSteerConfigError(f"unknown MLN preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    @classmethod
    def for_num_scales(cls, num_scales: int, **overrides) -> "MLNConfig":
        """The preset whose scale count matches a model (10 -> "512", 14 -> "1024", 6 -> "toy")."""
        for p in PRESETS.values():
            if p.num_scales == num_scales:
                return p.replace(**overrides)
        raise EditSteerConfigError(f"no MLN preset for a {num_scales}-scale model (presets: "
                                   + ", ".join(f"{n}: {p.num_scales} scales" for n, p in PRESETS.items())
                                   + "); build MLNConfig(num_scales=..., copy_scales=..., alphas=...) yourself")

    def neutral(self) -> "MLNConfig":
        """No nudging, nothing copied, no refinement: plain Switti sampling of the target prompt with the source
        prompt as the negative (the parity configuration)."""
        return dataclasses.replace(self, beta=0.0, alphas=(0.0,) * self.num_scales, copy_scales=0, refine_steps=0,
                                   name=f"{self.name}-neutral")

    def fast(self) -> "MLNConfig":
        """EditSteer's speed variant (not the official method): the mask from the second-to-last scale (0.56x the
        tokens at 512 px) and no TV weight on the last scale, whose source row is then not computed. At 512 px the
        transformer does 4476 instead of 6396 token-rows per edit (plain generation: 3456); each change alone would
        leave 5500 (mask) or 5372 (last-scale weight), over 1.5x plain."""
        K = self.num_scales
        return dataclasses.replace(self, mask_scale=K - 2, tv_stop=K - 1, name=f"{self.name}-fast")

    def replace(self, **kw) -> "MLNConfig":
        """A copy with fields replaced; unless ``name`` is given, the name records what changed (``"512+beta"``),
        so results and ``info["preset"]`` never pass a modified preset off as the official one."""
        new = dataclasses.replace(self, **kw)
        changed = [k for k in kw if k != "name" and getattr(new, k) != getattr(self, k)]
        if "name" in kw or not changed:
            return new
        return dataclasses.replace(new, name=f"{self.name}+{'+'.join(changed)}")

    def blocks_for_depth(self, depth: int) -> range:
        """Blocks averaged for the mask: explicit, or the official 3..26 of 30 scaled to ``depth``."""
        if self.mask_blocks is not None:
            a, b = self.mask_blocks
            if b > depth:
                raise EditSteerConfigError(f"mask_blocks {self.mask_blocks} exceed the model's {depth} blocks")
            return range(a, b)
        a = min(depth - 1, round(3 * depth / 30))
        return range(a, max(a + 1, round(27 * depth / 30)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, MLNConfig] = {
    "512": MLNConfig(num_scales=10, copy_scales=5, alphas=SMOOTH_512, cfg_stop=9, mask_quantile=0.80,
                     refine_steps=5, refine_tau=0.2, name="512"),
    "1024": MLNConfig(num_scales=14, copy_scales=7, alphas=interpolate_schedule(SMOOTH_512, 14), cfg_stop=13,
                      mask_quantile=0.63, refine_steps=3, refine_tau=0.8, name="1024"),
    "toy": MLNConfig(num_scales=6, copy_scales=0, alphas=interpolate_schedule(SMOOTH_512, 6), beta=4.0, cfg=2.0,
                     cfg_stop=5, mask_quantile=0.80, refine_steps=5, refine_tau=0.2, refine_keep="mask_tv",
                     anchor="residual", name="toy"),
}

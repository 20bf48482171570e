"""A masked-logit sampler for scale-wise (next-scale prediction) VAR models.

The sampler owns the per-scale loop and the logits; what happens to the logits is a list of small processors, each
``processor(scale_index, logits, state) -> logits`` (like transformers' ``LogitsProcessor``), so masks, nudges and
guidance compose and can be tested alone. A model plugs in through :class:`VARBackbone` (Switti:
:class:`diffusers_ext.switti.SwittiBackbone`; VAR, Infinity or HART need the same handful of methods; Infinity's
bit labels would bring their own token sampling).

At scale k the sampler:

1. copies the source tokens when ``k < copy_scales``;
2. otherwise asks the backbone for logits of the positive row and, when a processor needs it at this scale, the
   negative row (``groups=2``);
3. runs the processors on the positive logits, the negative logits and per-scale data in :class:`ScaleState`
   (the source tokens there are the fixed ones, or, given ``source_features``, the source re-tokenised over the
   prefix sampled so far);
4. samples a code map (:class:`SwittiTokenSampling`: soft Gumbel on guided scales, top-k / top-p otherwise);
5. accumulates it into ``f_hat``; reseeds the generator at every scale when asked.

Example (MLN's processors; :func:`diffusers_ext.mln.core.mln_edit` builds this for you)::

    sampler = MaskedLogitSampler(
        processors=[SourceNudge(beta=12, alphas=cfg.alphas, gamma=1.5), ClassifierFreeGuidance(8.0, 0, 9),
                    Temperature(0.1, start=9)],
        token_sampling=SwittiTokenSampling(smooth_start=2, smooth_stop=9, top_k=400, top_p=0.95))
    out = sampler.run(backbone, seed=42, source_tokens=idx, copy_scales=5, mask=M)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ..switti.sampling import gumbel_softmax, gumbel_tau, sample_top_k_top_p
from .masks import mask_at_scale
from .nudge import nudge_logits, tv_weight

# ----------------------------------------------------------------------------------------------------------------
# protocols


@runtime_checkable
class VARBackbone(Protocol):
    """What the sampler needs from a next-scale-prediction model with prepared prompt rows."""

    patch_nums: tuple[int, ...]
    batch: int

    def empty_fhat(self) -> torch.Tensor: ...

    def scale_logits(self, k: int, f_hat: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """(groups * batch, pn*pn, V) logits; group 0 positive prompt, group 1 negative prompt."""

    def embed_tokens(self, k: int, idx: torch.Tensor) -> torch.Tensor: ...

    def embed_probs(self, k: int, probs: torch.Tensor) -> torch.Tensor: ...

    def accumulate(self, k: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MLNBackbone(VARBackbone, Protocol):
    """What MLN needs on top of sampling: the source's tokens, cross-attention maps for the mask, decoding."""

    num_blocks: int
    nfe: int

    @property
    def codebook(self) -> torch.Tensor: ...

    def tokenize(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-scale source tokens (B, pn*pn) and the continuous features f (B, C, G, G)."""

    def prefix_fhat(self, tokens: list[torch.Tensor], upto: int) -> torch.Tensor: ...

    def residual_tokens(self, k: int, f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, pn*pn) tokens of scale k of a tokenisation of f continued over the prefix f_hat."""

    def cross_attention_maps(self, k: int, f_hat: torch.Tensor, groups: int, blocks: range) -> torch.Tensor:
        """(groups * B, pn*pn, T) text-attention probabilities at scale k, averaged over heads and ``blocks``."""

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ScaleState:
    """Per-scale data handed to the processors."""

    scale_index: int
    num_scales: int
    patch_num: int
    negative_logits: torch.Tensor | None = None  # (B, l, V): the negative / source prompt row, raw
    source_tokens: torch.Tensor | None = None  # (B, l): the source image's tokens at this scale
    mask: torch.Tensor | None = None  # (B, l) in [0, 1]: 1 = edit region, at this scale's grid
    extras: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.scale_index / (self.num_scales - 1) if self.num_scales > 1 else 1.0


class ScaleLogitsProcessor(Protocol):
    def __call__(self, scale_index: int, logits: torch.Tensor, state: ScaleState) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------------
# processors


class SourceNudge:
    """Masked nudge toward the source tokens: strength ``beta`` outside the mask, ``alphas[k]`` inside, times the
    TV-adaptive weight (``tv_adaptive``), applied as one bounded gradient-ascent step (:mod:`.nudge`)."""

    def __init__(self, beta: float, alphas: Sequence[float], gamma: float = 1.5, tv_adaptive: bool = True,
                 tv_stop: int | None = None):
        self.beta, self.alphas, self.gamma, self.tv_adaptive = float(beta), tuple(alphas), gamma, tv_adaptive
        self.tv_stop = len(self.alphas) if tv_stop is None else tv_stop

    def active(self, k: int) -> bool:
        return self.beta != 0 or self.alphas[k] != 0

    def weighted(self, k: int) -> bool:
        """Whether the TV-adaptive weight (which needs the source row's logits) applies at scale ``k``."""
        return self.tv_adaptive and k < self.tv_stop

    def needs_negative(self, k: int) -> bool:
        return self.weighted(k) and self.active(k)

    def strength(self, k: int, state: ScaleState, like: torch.Tensor) -> torch.Tensor:
        m = state.mask if state.mask is not None else torch.zeros(like.shape[:2], device=like.device)
        s = self.beta * (1 - m) + self.alphas[k] * m
        if self.weighted(k):
            w = tv_weight(like, state.negative_logits, self.gamma)
            state.extras["tv_weight"] = w
            s = s * w
        return s

    def __call__(self, k: int, logits: torch.Tensor, state: ScaleState) -> torch.Tensor:
        if state.source_tokens is None or not self.active(k):
            return logits
        s = self.strength(k, state, logits)
        state.extras["nudge_strength"] = s
        return nudge_logits(logits, state.source_tokens, s)


class ClassifierFreeGuidance:
    """``(1 + t) z - t z_neg`` with ``t = scale * k / (K - 1)`` on scales ``start <= k < stop``."""

    def __init__(self, scale: float, start: int, stop: int):
        self.scale, self.start, self.stop = float(scale), start, stop

    def needs_negative(self, k: int) -> bool:
        return self.start <= k < self.stop

    def __call__(self, k: int, logits: torch.Tensor, state: ScaleState) -> torch.Tensor:
        if not self.needs_negative(k):
            return logits
        t = self.scale * state.ratio
        return (1 + t) * logits - t * state.negative_logits


class Temperature:
    """Divide the logits by ``temperature`` on scales ``k >= start`` (Switti: once guidance is off)."""

    def __init__(self, temperature: float, start: int):
        self.temperature, self.start = float(temperature), start

    def needs_negative(self, k: int) -> bool:
        return False

    def __call__(self, k: int, logits: torch.Tensor, state: ScaleState) -> torch.Tensor:
        return logits / self.temperature if k >= self.start else logits


# ----------------------------------------------------------------------------------------------------------------
# token sampling and the loop


class SwittiTokenSampling:
    """Switti's rule: soft Gumbel-softmax on ``logits * (1 + r)`` at temperature ``max(0.27 (1 - 0.95 r), 0.005)``
    on scales ``smooth_start <= k < smooth_stop`` (``more_smooth``), top-k / top-p hard sampling otherwise."""

    def __init__(self, smooth_start: int = 2, smooth_stop: int = 10**9, top_k: int = 400, top_p: float = 0.95,
                 more_smooth: bool = True):
        self.smooth_start, self.smooth_stop = smooth_start, smooth_stop
        self.top_k, self.top_p, self.more_smooth = top_k, top_p, more_smooth

    def __call__(self, k: int, logits: torch.Tensor, state: ScaleState, backbone: VARBackbone,
                 generator: torch.Generator) -> torch.Tensor:
        if self.more_smooth and self.smooth_start <= k < self.smooth_stop:
            probs = gumbel_softmax(logits.mul(1 + state.ratio), gumbel_tau(state.ratio), generator)
            return backbone.embed_probs(k, probs)
        return backbone.embed_tokens(k, sample_top_k_top_p(logits, self.top_k, self.top_p, generator))


@dataclass
class SamplerOutput:
    f_hat: torch.Tensor
    nfe: int  # transformer row-passes (a CFG pair counts 2)
    extras: dict = field(default_factory=dict)


ScaleCallback = Callable[[int, int, torch.Tensor], None]


class MaskedLogitSampler:
    """The per-scale loop (see the module docstring). Stateless between runs."""

    def __init__(self, processors: Sequence[ScaleLogitsProcessor], token_sampling: SwittiTokenSampling):
        self.processors = list(processors)
        self.token_sampling = token_sampling

    def needs_negative(self, k: int) -> bool:
        return any(getattr(p, "needs_negative", lambda _k: False)(k) for p in self.processors)

    @torch.no_grad()
    def run(self, backbone: VARBackbone, *, seed: int | None = None, generator: torch.Generator | None = None,
            reseed_every_scale: bool = True, source_tokens: Sequence[torch.Tensor] | None = None,
            copy_scales: int = 0, mask: torch.Tensor | None = None, source_features: torch.Tensor | None = None,
            callback: ScaleCallback | None = None) -> SamplerOutput:
        """Sample ``f_hat``. ``mask`` (B, 1, G, G) in [0, 1]; ``source_tokens`` one (B, pn*pn) per scale.

        ``source_features`` (B, C, G, G), when given, moves the anchor of every sampled scale from the source's fixed
        tokens to the source re-tokenised over the prefix sampled so far (``backbone.residual_tokens``): the same
        tokens while the prefix is the source's, the ones that rebuild the source over an edited prefix.

        ``callback(k, K, f_hat)`` runs after every scale (progress, previews; raise to interrupt).
        """
        pns = tuple(backbone.patch_nums)
        K = len(pns)
        if copy_scales and source_tokens is None:
            raise ValueError("copy_scales > 0 needs source_tokens")
        if generator is None:
            generator = torch.Generator(device=backbone.empty_fhat().device)
            if seed is None:
                generator.seed()  # a fresh random seed, without touching torch's global generator
            else:
                generator.manual_seed(int(seed))
        seed0 = generator.initial_seed()
        f_hat = backbone.empty_fhat()
        B = f_hat.shape[0]
        nfe = 0
        tv: dict[int, torch.Tensor] = {}
        for k, pn in enumerate(pns):
            if reseed_every_scale:
                generator.manual_seed(seed0)
            src = None if source_tokens is None else source_tokens[k]
            if source_features is not None and k >= copy_scales:
                src = backbone.residual_tokens(k, source_features, f_hat)
            if k < copy_scales:
                h = backbone.embed_tokens(k, src)
            else:
                groups = 2 if self.needs_negative(k) else 1
                z = backbone.scale_logits(k, f_hat, groups)
                nfe += groups
                state = ScaleState(k, K, pn, negative_logits=z[B:] if groups == 2 else None, source_tokens=src,
                                   mask=None if mask is None else mask_at_scale(mask, pn))
                logits = z[:B]
                for p in self.processors:
                    logits = p(k, logits, state)
                h = self.token_sampling(k, logits, state, backbone, generator)
                if "tv_weight" in state.extras:
                    tv[k] = state.extras["tv_weight"]
            f_hat = backbone.accumulate(k, f_hat, h)
            if callback is not None:
                callback(k, K, f_hat)
        return SamplerOutput(f_hat=f_hat, nfe=nfe, extras={"tv_weight": tv})

"""VeriLatent's mathematics in plain torch: activation maps, expected region, score, difficulty, budget policy.

Nothing here knows about pipelines, schedulers or ComfyUI: every function takes tensors in the token layout
``[N, L, C]`` (N candidates, L target tokens, C channels) and returns tensors. The diffusers wrapper, the sampler
protocol of :mod:`.search` and the ComfyUI nodes all call these functions.

Example (score four candidates' early predictions against the source latent)::

    import torch
    from diffusers_ext.verilatent import VeriLatentConfig, core
    cfg = VeriLatentConfig.adaptive()
    source = torch.zeros(64, 16)                       # [L, C] source latent tokens (8x8 grid)
    x0 = torch.randn(4, 64, 16) * 0.1                  # [N, L, C] predicted clean latents at step k
    x0[:3, :8] += 2.0                                  # three candidates edit the first row, one does nothing
    j = core.judge(x0, source, cfg)
    j.scores.argmax(), j.easy, core.BudgetPolicy(cfg).next_round(4, j)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import EditSteerConfigError
from .config import VeriLatentConfig

# ---------------------------------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------------------------------


def predicted_clean(x_prev: torch.Tensor, x_next: torch.Tensor, sigma_prev: float, sigma_next: float) -> torch.Tensor:
    """x̂0 of a flow-matching Euler step x_next = x_prev + (sigma_next - sigma_prev) v, without the velocity:
    v = (x_next - x_prev) / (sigma_next - sigma_prev) and x̂0 = x_prev - sigma_prev v (= x_next - sigma_next v).

    Works for any guidance (true CFG, rescaled CFG): it recovers the velocity the sampler actually used.
    """
    ds = float(sigma_next) - float(sigma_prev)
    if ds == 0.0:
        raise EditSteerConfigError("predicted_clean: the two sigmas are equal; the step did not move")
    wide = torch.float32 if x_next.device.type == "mps" else torch.float64  # MPS has no float64
    xp, xn = x_prev.to(wide), x_next.to(wide)
    v = (xn - xp) / ds
    return (xn - float(sigma_next) * v).to(x_next.dtype)


def clean_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """x̂0 = x - sigma v (flow matching, x = (1 - sigma) x0 + sigma noise)."""
    return x - float(sigma) * v


# ---------------------------------------------------------------------------------------------------------------------
# Activation maps
# ---------------------------------------------------------------------------------------------------------------------


def latent_activation(x0: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A[j, p] = ||x0[j, p] - source[p]||_2 over channels. ``x0`` [N, L, C]; ``source`` [L, C] or [N, L, C]."""
    if x0.dim() != 3:
        raise EditSteerConfigError(f"x0 must be [N, L, C] token latents, got shape {tuple(x0.shape)}")
    src = source if source.dim() == 3 else source.unsqueeze(0)
    if src.shape[-2:] != x0.shape[-2:]:
        raise EditSteerConfigError(
            f"source latent tokens {tuple(source.shape)} do not align with the predicted latents {tuple(x0.shape)}: "
            "the activation map needs the output and the input image at the same resolution")
    return (x0.float() - src.float()).norm(dim=-1)


def normalise_map(a: torch.Tensor, mode: str = "max", temperature: float = 0.1) -> torch.Tensor:
    """Per-candidate normalisation of [N, L] maps into [0, 1] with max 1 ("max": A / max A; "softmax":
    softmax(A / (temperature max A)) / its max, which sharpens the map). All-zero maps stay zero."""
    a = a.float()
    peak = a.amax(dim=-1, keepdim=True)
    safe = peak.clamp_min(1e-12)
    if mode == "max":
        out = a / safe
    elif mode == "softmax":
        out = torch.exp((a - peak) / (temperature * safe))
    else:
        raise EditSteerConfigError(f"unknown normalisation {mode!r}; use 'max' or 'softmax'")
    return torch.where(peak > 0, out, torch.zeros_like(out))


def activation_used(cfg: VeriLatentConfig, attention: torch.Tensor | None) -> str:
    """The map the score actually uses: ``"mix"`` without a captured attention map is the latent map."""
    return "latent" if cfg.activation == "mix" and attention is None else cfg.activation


def combine_maps(latent: torch.Tensor, attention: torch.Tensor | None, cfg: VeriLatentConfig) -> torch.Tensor:
    """The normalised editing activation map Â used by the score, per ``cfg.activation``."""
    lat = normalise_map(latent, cfg.normalise, cfg.temperature)
    if activation_used(cfg, attention) == "latent":
        return lat
    if attention is None:
        raise EditSteerConfigError(
            f"activation={cfg.activation!r} needs an attention map, but none was captured (the transformer's "
            "double-stream attention was not found); use activation='latent'")
    att = normalise_map(attention, cfg.normalise, cfg.temperature)
    if cfg.activation == "attention":
        return att
    return (1.0 - cfg.attention_weight) * lat + cfg.attention_weight * att


# ---------------------------------------------------------------------------------------------------------------------
# Masks and grids
# ---------------------------------------------------------------------------------------------------------------------


def factor_grid(tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """(h, w) with h * w = tokens and w / h closest to ``aspect`` (the token grid when only a count is known)."""
    best = (1, tokens)
    for h in range(1, int(math.isqrt(tokens)) + 1):
        if tokens % h == 0:
            for hh, ww in ((h, tokens // h), (tokens // h, h)):
                if abs(math.log(ww / hh / aspect)) < abs(math.log(best[1] / best[0] / aspect)):
                    best = (hh, ww)
    return best


def mask_to_tokens(mask, grid: tuple[int, int]) -> torch.Tensor:
    """A user mask (H x W, bool or [0, 1] floats; torch, numpy or PIL) as a soft [L] token mask on ``grid``.

    Accepted sizes: the token grid itself, or any integer multiple of it with the same aspect (pixel masks at the
    output size, latent-size masks). Each token gets the share of its pixels that the mask covers.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if not isinstance(mask, torch.Tensor):
        import numpy as np

        mask = torch.from_numpy(np.array(mask))
    m = mask.detach().float().cpu()
    if m.dim() == 3 and m.shape[-1] in (1, 3, 4) and m.shape[0] not in (1,):  # HxWxC (PIL / numpy images)
        m = m[..., 0]
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise EditSteerConfigError(f"mask must be a 2-D H x W array, got shape {tuple(mask.shape)}")
    h, w = m.shape
    if h % gh or w % gw or h // gh != w // gw or h < gh:
        raise EditSteerConfigError(
            f"mask of size {h}x{w} does not fit the edit's token grid {gh}x{gw}: pass a mask of the output image's "
            f"size, or of the token grid ({gh}x{gw}), or any multiple (s*{gh})x(s*{gw})")
    if m.max() > 1.0 and m.max() <= 255.0:
        m = m / 255.0
    if m.min() < 0 or m.max() > 1:
        raise EditSteerConfigError("mask values must be in [0, 1] (bool, float) or [0, 255] (uint8)")
    s = h // gh
    tok = m.reshape(gh, s, gw, s).mean(dim=(1, 3)).reshape(-1)
    if tok.sum() <= 0:
        raise EditSteerConfigError("mask is empty: mark the region the edit should change (or pass no mask)")
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Region, score, difficulty
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Region:
    """The expected edit region per candidate, [N, L] soft masks in [0, 1] (rows differ with leave-one-out)."""

    masks: torch.Tensor
    kind: str  # "mask" | "consensus" | "global"
    coverage: float  # mean of the (full) consensus, or of the user mask

    @property
    def mean(self) -> torch.Tensor:
        return self.masks.mean(0)


def expected_region(ahat: torch.Tensor, cfg: VeriLatentConfig, mask: torch.Tensor | None = None) -> Region:
    """R from a user token mask (wins), else the candidates' consensus (leave-one-out when N >= 2), else R = 1."""
    n, length = ahat.shape
    if mask is not None:
        m = mask.to(ahat).reshape(1, length).expand(n, length)
        return Region(m.clone(), "mask", float(mask.float().mean()))
    w = consensus_weights(ahat, cfg.consensus)
    full = (w[:, None] * ahat).sum(0) / w.sum().clamp_min(1e-12)
    coverage = float(full.mean())
    if cfg.region == "global" or (cfg.global_coverage is not None and coverage >= cfg.global_coverage) or n < 2:
        return Region(torch.ones_like(ahat), "global", coverage)
    if cfg.leave_one_out:
        wsum = (w.sum() - w).clamp_min(1e-12)
        r = ((w[:, None] * ahat).sum(0, keepdim=True) - w[:, None] * ahat) / wsum[:, None]
    else:
        r = full.unsqueeze(0).expand(n, length).clone()
    return Region(r, "consensus", coverage)


def consensus_weights(ahat: torch.Tensor, mode: str = "contrast") -> torch.Tensor:
    """Each candidate's vote on the expected region. ``"mean"``: equal votes. ``"contrast"``: 1 - mean_p Â_j, so a
    map that is high everywhere (a leak, or the noise of a candidate that made no edit, normalised by its max) votes
    little and a localised edit votes fully; when every candidate edits everywhere (a global edit) the votes are
    equal again. Never all zero."""
    if mode == "mean":
        return torch.ones(ahat.shape[0], dtype=ahat.dtype)
    if mode != "contrast":
        raise EditSteerConfigError(f"unknown consensus weighting {mode!r}; use 'contrast' or 'mean'")
    w = (1.0 - ahat.mean(-1)).clamp_min(0.0)
    return w if float(w.sum()) > 1e-6 else torch.ones_like(w)


def score(a: torch.Tensor, ahat: torch.Tensor, region: torch.Tensor, cfg: VeriLatentConfig,
          scale: float = 1.0) -> dict[str, torch.Tensor]:
    """S_j = <Â_j,R_j>/|R_j|_1 - lam <Â_j,1-R_j>/|1-R_j|_1 + mu log(eps + <A_j,R_j>/|R_j|_1 / scale)
    (methods.md §3.4.5; ``scale``, the source's mean token norm, makes the magnitude term, and so the thresholds,
    independent of the latent space's units).

    Returns the total ``score`` [N] and its parts ``inside``, ``leak``, ``magnitude``. A region covering every
    token has no outside: its leak term is 0.
    """
    r = region.to(ahat)
    r_in = r.sum(-1).clamp_min(1e-8)
    r_out = (1.0 - r).sum(-1)
    inside = (ahat * r).sum(-1) / r_in
    leak = torch.where(r_out > 1e-6, (ahat * (1.0 - r)).sum(-1) / r_out.clamp_min(1e-8), torch.zeros_like(r_out))
    magnitude = torch.log(cfg.eps + (a.float() * r).sum(-1) / r_in / max(float(scale), 1e-12))
    total = inside - cfg.lam * leak + cfg.mu * magnitude
    return {"score": total, "inside": inside, "leak": leak, "magnitude": magnitude}


@dataclass
class Difficulty:
    """How hard the edit looks from the candidates judged so far (methods.md §3.4.6)."""

    best: float  # max_j S_j
    margin: float  # top-1 minus median score
    agreement: float  # mean cosine between each candidate's map and the consensus (1 = all edit the same place)
    easy: bool

    def to_json(self) -> dict:
        return {"best": self.best, "margin": self.margin, "agreement": self.agreement, "easy": self.easy}


def difficulty(scores: torch.Tensor, ahat: torch.Tensor, cfg: VeriLatentConfig,
               activation: str | None = None) -> Difficulty:
    s = scores.float()
    best = float(s.max())
    margin = float(best - s.median()) if s.numel() > 1 else 0.0
    cons = ahat.mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(ahat, cons.expand_as(ahat), dim=-1)
    agreement = float(cos.mean())
    easy = best >= cfg.easy_threshold(activation) and (
        s.numel() < 2 or (margin >= cfg.tau_margin and agreement >= cfg.tau_agreement))
    return Difficulty(best, margin, agreement, bool(easy))


@dataclass
class Judgement:
    """Everything the verifier concluded about a set of candidates (all tensors on CPU, float32)."""

    activation: torch.Tensor  # [N, L] raw latent map A
    normalised: torch.Tensor  # [N, L] Â used by the score
    region: Region
    parts: dict[str, torch.Tensor]
    difficulty: Difficulty
    attention: torch.Tensor | None = None  # [N, L] raw attention map, when captured
    used: str = "latent"  # the map the score used ("mix" falls back to "latent" without attention)

    @property
    def scores(self) -> torch.Tensor:
        return self.parts["score"]

    @property
    def easy(self) -> bool:
        return self.difficulty.easy

    def ranking(self) -> list[int]:
        """Candidate indices, best first (ties: the lower index, i.e. the lower seed, first)."""
        s = self.scores.tolist()
        return sorted(range(len(s)), key=lambda j: (-s[j], j))


def judge_maps(a: torch.Tensor, cfg: VeriLatentConfig, mask: torch.Tensor | None = None,
               attention: torch.Tensor | None = None, scale: float = 1.0) -> Judgement:
    """Judge candidates from their raw activation maps ``a`` [N, L] (and optional attention maps [N, L]);
    ``scale`` is the unit of the magnitude term (see :func:`score`)."""
    a = a.detach().float().cpu()
    att = attention.detach().float().cpu() if attention is not None else None
    ahat = combine_maps(a, att, cfg)
    region = expected_region(ahat, cfg, mask)
    parts = score(a, ahat, region.masks, cfg, scale)
    used = activation_used(cfg, att)
    return Judgement(a, ahat, region, parts, difficulty(parts["score"], ahat, cfg, used), att, used)


def source_scale(source: torch.Tensor) -> float:
    """The unit of the magnitude term: the source's mean token norm (1 for an all-zero source)."""
    v = float(source.float().norm(dim=-1).mean())
    return v if v > 1e-8 else 1.0


def judge(x0: torch.Tensor, source: torch.Tensor, cfg: VeriLatentConfig, mask: torch.Tensor | None = None,
          attention: torch.Tensor | None = None) -> Judgement:
    """Judge N candidates from their early clean-latent predictions ``x0`` [N, L, C] against ``source`` [L, C]."""
    return judge_maps(latent_activation(x0, source), cfg, mask, attention, source_scale(source))


def pixel_activation(images: torch.Tensor, source: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """The activation map of *decoded* images: ||img - src||_2 over RGB, average-pooled by ``pool`` -> [N, L].

    ``images`` [N, H, W, 3] and ``source`` [H, W, 3], both in [0, 1]. Used by the decode-then-verify baseline
    (best-of-N), which scores final images with the same region/score rules as VeriLatent's latent verifier.
    """
    d = (images.float() - source.float().unsqueeze(0)).norm(dim=-1)  # [N, H, W]
    if pool > 1:
        h, w = d.shape[-2:]
        if h % pool or w % pool:
            raise EditSteerConfigError(f"pool={pool} does not divide the image size {h}x{w}")
        d = torch.nn.functional.avg_pool2d(d.unsqueeze(1), pool).squeeze(1)
    return d.reshape(d.shape[0], -1)


def medoid_ranking(x: torch.Tensor) -> list[int]:
    """Self-consistency: candidates ranked by their summed L2 distance to the other candidates (the medoid first;
    unsquared, so one outlier does not pull the choice towards it). ``x`` [N, ...]; for decoded images this is the
    majority-vote verifier of best-of-N."""
    flat = x.detach().float().reshape(x.shape[0], -1)
    d = torch.cdist(flat, flat).sum(1)
    v = d.tolist()
    return sorted(range(len(v)), key=lambda j: (v[j], j))


# ---------------------------------------------------------------------------------------------------------------------
# Budget policy
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class BudgetPolicy:
    """The adaptive budget: start with ``n0``; while the edit is not easy and fewer than ``n_max`` candidates were
    tried, draw ``round_size`` more; then continue the ``top_m`` best to the last step."""

    cfg: VeriLatentConfig
    history: list[int] = field(default_factory=list)

    def first_round(self) -> int:
        return self.cfg.n0

    def next_round(self, tried: int, judgement: Judgement) -> int:
        """How many candidates the next round draws (0: stop searching)."""
        if judgement.easy or tried >= self.cfg.max_candidates:
            return 0
        return min(self.cfg.round_size, self.cfg.max_candidates - tried)

    def finalists(self, judgement: Judgement) -> list[int]:
        return judgement.ranking()[: self.cfg.top_m]


def bucket(round_one_easy: bool, final_easy: bool) -> str:
    """The difficulty bucket of an edit: ``easy`` (judged easy after the first round), ``medium`` (became easy with
    more candidates), ``hard`` (never reached the easy threshold within the budget)."""
    if round_one_easy:
        return "easy"
    return "medium" if final_easy else "hard"

"""The VeriLatent search loop, written against a small sampler protocol so that one loop drives a diffusers
pipeline (:mod:`.diffusers_wrapper`), a plain Euler flow loop (:class:`FlowEulerSampler`) and ComfyUI's
SAMPLER/GUIDER objects.

The protocol (:class:`CandidateSampler`)
----------------------------------------
A sampler owns one edit (the source image, the instruction, the schedule of T steps) and knows how to denoise
candidate noises. It exposes:

``num_steps: int``
    T, the steps of a full run.
``passes_per_step: int``
    model passes per candidate per step (2 when conditional and unconditional predictions run as separate passes,
    as with Qwen-Image-Edit's true CFG; 2 as well when they run as one doubled batch, as in ComfyUI). Used for NFE.
``rollout(seeds: list[int], k: int) -> Rollout``
    Start one candidate per seed from the noise that seed gives (the same noise a plain run with that seed uses),
    run steps ``0 .. k-1`` (sigma_0 -> sigma_k) on all of them as a batch, and return
    ``Rollout(latents, x0, source, attention=None, grid=None)``:

    * ``latents`` ``[n, ...]``: the sampler state after step k, in the sampler's own layout. The search only
      indexes it along dim 0 and hands rows back to ``finish``.
    * ``x0`` ``[n, L, C]``: the predicted clean latent at the last early step (x̂0 = x - sigma v; ComfyUI's
      ``denoised``), as L target tokens of C channels.
    * ``source`` ``[L, C]``: the source image's latent in the same token layout (the editing condition).
    * ``attention`` ``[n, L]`` (optional): an attention-based activation map captured during the k steps.
    * ``grid`` ``(h, w)`` (optional): the token grid, h * w = L (for user masks and map pictures).

    A rollout that sees a user interrupt raises :class:`SearchInterrupted`.
``finish(latents: Tensor, k: int) -> Finished``
    Continue the given rows of rollout ``latents`` from step k to the end (sigma_k -> 0) and return
    ``Finished(output, tokens=None)``: ``output`` is whatever the front end returns to its user (decoded images,
    a LATENT dict...), ``tokens`` ``[m, L, C]`` (optional) the final clean latents, used to rank several finalists.
    A finished candidate must equal a straight T-step run of its seed (the tests check <= 1e-5).
``single(seed: int, k: int) -> tuple[Finished, Rollout | None]`` (optional)
    A straight T-step run of one seed, exactly as the plain sampler would run it (budget 1), optionally reporting
    the step-k prediction it saw on the way (no extra model passes). Without it, budget 1 runs rollout + finish.
    The step-k map is optional at budget 1: a sampler that cannot make it returns ``None`` (and may say why in a
    ``notes`` list attribute); it must never fail the plain run for it.

Optional attributes read after the search: ``nfe_measured`` (model rows actually run), ``overhead_s`` (verifier work
done by the sampler outside model calls), ``capture_s`` (verifier work done inside model calls, e.g. attention
capture hooks), ``notes`` (list of strings copied into the report).

Everything else (maps, region, score, difficulty, budget rounds, NFE) is done here and in :mod:`.core`.

Example (a plain Euler flow loop over any ``denoise(x, sigma) -> x̂0``)::

    import torch
    from diffusers_ext.verilatent import VeriLatentConfig
    from diffusers_ext.verilatent.search import FlowEulerSampler, run_search
    source = torch.zeros(16, 4)                                         # [L, C]
    def denoise(x, sigma):                                              # a stand-in model: pulls toward +1 in row 0
        target = source.clone(); target[:4] = 1.0
        return target.expand_as(x) + 0.1 * x
    sampler = FlowEulerSampler(denoise, torch.linspace(1, 0, 9), lambda s: torch.randn(
        1, 16, 4, generator=torch.Generator().manual_seed(s)), source)
    result = run_search(sampler, VeriLatentConfig.adaptive(k=2), seed=0)
    result.output.shape, result.report.chosen_seeds, result.report.nfe
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import EditSteerConfigError, EditSteerError
from . import core
from .config import VeriLatentConfig

logger = logging.getLogger(__name__)


class SearchInterrupted(EditSteerError):
    """The user interrupted sampling while the candidates were being judged."""


@dataclass
class Rollout:
    latents: torch.Tensor
    x0: torch.Tensor
    source: torch.Tensor
    attention: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@dataclass
class Finished:
    output: Any
    tokens: torch.Tensor | None = None


@runtime_checkable
class CandidateSampler(Protocol):
    num_steps: int
    passes_per_step: int

    def rollout(self, seeds: list[int], k: int) -> Rollout: ...

    def finish(self, latents: torch.Tensor, k: int) -> Finished: ...


@dataclass
class SearchReport:
    """What the search did and why (JSON-able via :meth:`to_json`; the maps stay tensors)."""

    config: dict
    num_steps: int
    passes_per_step: int
    seeds: list[int] = field(default_factory=list)
    round_sizes: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    finalists: list[int] = field(default_factory=list)  # candidate indices continued to the end, early rank order
    order: list[int] = field(default_factory=list)  # finalists' positions in the output, best first
    final_scores: list[float] | None = None
    round_one: dict | None = None  # difficulty after round one
    difficulty: dict | None = None  # difficulty after the last round
    bucket: str = "single"
    region_kind: str = ""
    activation_used: str = ""  # the map the score used ("mix" without captured attention is "latent")
    region_coverage: float = 0.0
    nfe: int = 0
    nfe_measured: int | None = None
    wall_s: float = 0.0
    verify_s: float = 0.0  # time in the verifier (maps, region, scores, policy) and the samplers' capture code
    capture_s: float = 0.0  # the part of verify_s spent inside model calls (capture hooks), timed as model time
    notes: list[str] = field(default_factory=list)  # what the search could not do, and why (e.g. no step-k map)
    interrupted: bool = False
    grid: tuple[int, int] | None = None
    activation: torch.Tensor | None = None  # [N, L] raw latent maps A
    normalised: torch.Tensor | None = None  # [N, L] Â
    attention: torch.Tensor | None = None  # [N, L] when captured
    region: torch.Tensor | None = None  # [L] mean expected region

    @property
    def rounds(self) -> int:
        return len(self.round_sizes)

    @property
    def candidates(self) -> int:
        return len(self.seeds)

    @property
    def chosen(self) -> int | None:
        """Index (into ``seeds``) of the candidate returned first."""
        return self.finalists[self.order[0]] if self.finalists else None

    @property
    def chosen_seeds(self) -> list[int]:
        return [self.seeds[self.finalists[i]] for i in self.order]

    def maps(self) -> dict[str, torch.Tensor]:
        """The maps as [N, h, w] pictures on the token grid (region as [h, w])."""
        if self.grid is None or self.activation is None:
            return {}
        h, w = self.grid
        out = {"activation": self.activation.reshape(-1, h, w), "normalised": self.normalised.reshape(-1, h, w)}
        if self.attention is not None:
            out["attention"] = self.attention.reshape(-1, h, w)
        if self.region is not None:
            out["region"] = self.region.reshape(h, w)
        return out

    def to_json(self) -> dict:
        return {
            "config": self.config, "num_steps": self.num_steps, "passes_per_step": self.passes_per_step,
            "seeds": self.seeds, "round_sizes": self.round_sizes, "rounds": self.rounds,
            "candidates": self.candidates, "scores": self.scores, "parts": self.parts, "finalists": self.finalists,
            "order": self.order, "chosen_seeds": self.chosen_seeds if self.finalists else [],
            "final_scores": self.final_scores, "round_one": self.round_one, "difficulty": self.difficulty,
            "bucket": self.bucket, "region_kind": self.region_kind, "region_coverage": self.region_coverage,
            "activation_used": self.activation_used,
            "nfe": self.nfe, "nfe_measured": self.nfe_measured, "wall_s": self.wall_s, "verify_s": self.verify_s,
            "capture_s": self.capture_s, "interrupted": self.interrupted,
            "grid": list(self.grid) if self.grid else None, "notes": list(self.notes),
        }


@dataclass
class SearchResult:
    output: Any
    report: SearchReport


def _chunks(seq: Sequence[int], size: int | None) -> list[list[int]]:
    size = size or len(seq)
    return [list(seq[i:i + size]) for i in range(0, len(seq), size)]


def run_search(sampler: CandidateSampler, config: VeriLatentConfig, seed: int, *, mask=None,
               on_event: Callable[[str, dict], None] | None = None) -> SearchResult:
    """Run VeriLatent with ``sampler``: judge ``n0`` candidates after k steps, add rounds while the edit looks hard
    (adaptive), continue the ``top_m`` best, and return the sampler's output for them plus a :class:`SearchReport`.

    ``seed``: candidate j starts from the noise of seed ``seed + j``. ``mask`` (optional): the region the edit should
    change (H x W, see :func:`core.mask_to_tokens`); it replaces the consensus region. ``on_event(name, info)`` is
    called after each round (``"round"``) and after finishing (``"finish"``), for progress bars.
    """
    if not isinstance(config, VeriLatentConfig):
        raise EditSteerConfigError(f"config must be a VeriLatentConfig, got {type(config).__name__}")
    T = int(sampler.num_steps)
    config.check_steps(T)
    k = config.k
    report = SearchReport(config=config.to_dict(), num_steps=T, passes_per_step=int(sampler.passes_per_step))
    t_start = time.perf_counter()
    verify = 0.0
    event = on_event or (lambda name, info: None)

    if config.budget == 1:
        report.seeds, report.round_sizes = [seed], [1]
        single = getattr(sampler, "single", None)
        try:
            if single is not None:
                finished, ro = single(seed, k)
            else:
                ro = sampler.rollout([seed], k)
                finished = sampler.finish(ro.latents, k)
        except SearchInterrupted:
            report.interrupted = True
            report.wall_s = time.perf_counter() - t_start
            return SearchResult(None, report)
        report.finalists, report.order = [0], [0]
        report.passes_per_step = int(sampler.passes_per_step)
        report.nfe = T * report.passes_per_step
        if ro is not None:  # the map is a by-product of the plain run: failing to make it must not fail the run
            t0 = time.perf_counter()
            try:
                tok = None if mask is None else core.mask_to_tokens(mask, ro.grid or core.factor_grid(ro.x0.shape[1]))
                j = core.judge(ro.x0, ro.source, config, tok, ro.attention)
            except EditSteerError as e:
                report.notes.append(f"no step-{k} map for this budget-1 run (the output is the plain sampler's): {e}")
                logger.warning("VeriLatent: %s", report.notes[-1])
            else:
                _fill_judgement(report, j, ro.grid)
                report.round_one = report.difficulty = j.difficulty.to_json()
            verify += time.perf_counter() - t0
        _finish_timing(report, sampler, verify, t_start)
        event("finish", {"nfe": report.nfe})
        return SearchResult(finished.output, report)

    policy = core.BudgetPolicy(config)
    latents: list[torch.Tensor] = []
    x0s: list[torch.Tensor] = []
    atts: list[torch.Tensor | None] = []
    source = grid = tokens_mask = judgement = None
    size = policy.first_round()
    try:
        while size > 0:
            seeds = list(range(seed + len(report.seeds), seed + len(report.seeds) + size))
            for chunk in _chunks(seeds, config.rollout_batch):
                ro = sampler.rollout(chunk, k)
                if ro.x0.shape[0] != len(chunk) or ro.latents.shape[0] != len(chunk):
                    raise EditSteerError(f"sampler returned {ro.x0.shape[0]} candidates for {len(chunk)} seeds")
                latents.append(ro.latents)
                x0s.append(ro.x0.detach().float().cpu())
                atts.append(None if ro.attention is None else ro.attention.detach().float().cpu())
                if source is None:
                    source, grid = ro.source.detach().float().cpu(), ro.grid
            report.seeds += seeds
            report.round_sizes.append(size)
            t0 = time.perf_counter()
            if grid is None:
                grid = core.factor_grid(x0s[0].shape[1])
            if mask is not None and tokens_mask is None:
                tokens_mask = core.mask_to_tokens(mask, grid)
            attention = torch.cat(atts) if all(a is not None for a in atts) else None
            judgement = core.judge(torch.cat(x0s), source, config, tokens_mask, attention)
            if report.round_one is None:
                report.round_one = judgement.difficulty.to_json()
            size = policy.next_round(len(report.seeds), judgement)
            verify += time.perf_counter() - t0
            event("round", {"round": report.rounds, "candidates": len(report.seeds), "best": judgement.difficulty.best,
                            "easy": judgement.easy})
    except SearchInterrupted:
        report.interrupted = True
        report.wall_s = time.perf_counter() - t_start
        return SearchResult(None, report)

    t0 = time.perf_counter()
    _fill_judgement(report, judgement, grid)
    report.difficulty = judgement.difficulty.to_json()
    report.bucket = core.bucket(report.round_one["easy"], judgement.easy)
    report.finalists = policy.finalists(judgement)
    all_latents = torch.cat(latents)
    chosen = all_latents[torch.tensor(report.finalists, device=all_latents.device)]
    verify += time.perf_counter() - t0

    try:
        finished = sampler.finish(chosen, k)
    except SearchInterrupted:
        report.interrupted = True
        report.wall_s = time.perf_counter() - t_start
        return SearchResult(None, report)

    t0 = time.perf_counter()
    report.order = list(range(len(report.finalists)))
    if finished.tokens is not None and len(report.finalists) > 1:
        region = judgement.region.mean.unsqueeze(0)
        a = core.latent_activation(finished.tokens.detach().float().cpu(), source)
        ahat = core.normalise_map(a, config.normalise, config.temperature)
        fs = core.score(a, ahat, region.expand_as(a), config, core.source_scale(source))["score"]
        report.final_scores = fs.tolist()
        report.order = sorted(range(len(fs)), key=lambda i: (-float(fs[i]), i))
    verify += time.perf_counter() - t0

    report.passes_per_step = int(sampler.passes_per_step)
    report.nfe = config.nfe(T, len(report.seeds), report.passes_per_step)
    _finish_timing(report, sampler, verify, t_start)
    event("finish", {"nfe": report.nfe})
    return SearchResult(finished.output, report)


def _finish_timing(report: SearchReport, sampler, verify: float, t_start: float) -> None:
    """NFE measured, notes and timings: verifier time = the loop's own + the sampler's work outside model calls
    (``overhead_s``) + its capture hooks inside model calls (``capture_s``, e.g. attention recomputation)."""
    report.nfe_measured = getattr(sampler, "nfe_measured", None)
    report.notes += list(getattr(sampler, "notes", None) or [])
    report.capture_s = float(getattr(sampler, "capture_s", 0.0))
    report.verify_s = verify + float(getattr(sampler, "overhead_s", 0.0)) + report.capture_s
    report.wall_s = time.perf_counter() - t_start


def _fill_judgement(report: SearchReport, j: core.Judgement, grid) -> None:
    report.scores = j.scores.tolist()
    report.parts = {k: v.tolist() for k, v in j.parts.items() if k != "score"}
    report.region_kind, report.region_coverage = j.region.kind, j.region.coverage
    report.activation_used = j.used
    report.activation, report.normalised, report.attention = j.activation, j.normalised, j.attention
    report.region = j.region.mean
    report.grid = tuple(grid) if grid is not None else core.factor_grid(j.activation.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# A sampler-level implementation: the plain Euler flow loop (the shape a ComfyUI KSAMPLER/GUIDER reuses)
# ---------------------------------------------------------------------------------------------------------------------


class FlowEulerSampler:
    """:class:`CandidateSampler` over a plain Euler flow-matching loop.

    ``denoise(x, sigma) -> x̂0``: the model as ComfyUI's sampler functions see it (``model(x, sigma * s_in)``),
    batched over candidates. ``sigmas``: T + 1 values ending in 0. ``noise(seed) -> [1, ...]``: the initial noise of
    a seed (at sigma_0 = 1 a flow model starts from pure noise). ``source`` ``[L, C]``: the source latent tokens.
    ``to_tokens``: maps a batch of the sampler's latents ``[n, ...]`` to ``[n, L, C]`` tokens (default identity;
    for ComfyUI's ``[n, C, H, W]`` use :func:`spatial_tokens`). The Euler update is ComfyUI's
    ``x + (x - denoised) / sigma * (sigma_next - sigma)``.
    """

    def __init__(self, denoise: Callable[[torch.Tensor, float], torch.Tensor], sigmas,
                 noise: Callable[[int], torch.Tensor], source: torch.Tensor, *,
                 to_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None, passes_per_step: int = 1,
                 grid: tuple[int, int] | None = None, callback=None):
        self.denoise = denoise
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if self.sigmas.numel() < 2 or float(self.sigmas[-1]) != 0.0:
            raise EditSteerConfigError("sigmas must hold T + 1 >= 2 values ending in 0")
        self.noise = noise
        self.source = source
        self.to_tokens = to_tokens or (lambda x: x)
        self.passes_per_step = passes_per_step
        self.grid = grid
        self.callback = callback
        self.nfe_measured = 0

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def _run(self, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        denoised = None
        for i in range(start, stop):
            s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
            denoised = self.denoise(x, s)
            self.nfe_measured += x.shape[0] * self.passes_per_step
            if self.callback is not None:
                self.callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})
            x = x + (x - denoised) / s * (s_next - s)
        return x, denoised

    def rollout(self, seeds: list[int], k: int) -> Rollout:
        x = torch.cat([self.noise(s) for s in seeds])
        x, denoised = self._run(x, 0, k)
        return Rollout(latents=x, x0=self.to_tokens(denoised), source=self.source, grid=self.grid)

    def finish(self, latents: torch.Tensor, k: int) -> Finished:
        x, _ = self._run(latents, k, self.num_steps)
        return Finished(output=x, tokens=self.to_tokens(x))

    def single(self, seed: int, k: int) -> tuple[Finished, Rollout | None]:
        x = self.noise(seed)
        if not 1 <= k < self.num_steps:
            return self.finish(x, 0), None
        x_k, denoised = self._run(x, 0, k)
        ro = Rollout(latents=x_k, x0=self.to_tokens(denoised), source=self.source, grid=self.grid)
        return self.finish(x_k, k), ro


def spatial_tokens(x: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] latents (ComfyUI's LATENT layout) -> [n, H*W, C] tokens (one token per latent pixel)."""
    return x.flatten(2).transpose(1, 2)


def ksampler_function(config: VeriLatentConfig, source: torch.Tensor, *, to_tokens=spatial_tokens,
                      mask=None, grid: tuple[int, int] | None = None, on_report=None, passes_per_step: int = 1):
    """A k-diffusion-style sampler function that searches *within the batch it is given* (fixed budget).

    Returns ``sample(model, x, sigmas, extra_args=None, callback=None, disable=None)`` in the form ComfyUI's
    ``comfy.samplers.KSAMPLER(sample)`` wraps: ``x`` holds the N candidates (already noise-scaled), ``model(x,
    sigma * s_in, **extra_args)`` returns x̂0. It runs Euler steps 0..k-1 on all N, judges them with :mod:`.core`
    against ``source`` (``[L, C]`` tokens, or the source LATENT ``[1, C, H, W]`` turned into tokens by ``to_tokens``),
    keeps the ``top_m`` best (batch shrinks N -> m) and finishes them. Extra rounds need fresh noise, so the adaptive
    budget lives in :func:`run_search` (the GUIDER shape): an adaptive config (``n_max > n0``) is refused here, and
    ``config.n0`` must equal the batch. ``passes_per_step``: model passes behind one ``model(...)`` call per row
    (2 when it runs conditional and unconditional predictions, i.e. ComfyUI with cfg != 1 and a negative); the
    report's NFE is multiplied by it. ``on_report`` receives the :class:`SearchReport`.
    """
    if config.is_adaptive:
        raise EditSteerConfigError(
            f"ksampler_function searches within the batch it is given (one round), but this config is adaptive "
            f"(n0={config.n0}, n_max={config.n_max}): further rounds need fresh noise; use run_search (or ComfyUI's "
            "VeriLatent Sampler) for an adaptive search, or VeriLatentConfig.fixed(n) here")
    if not isinstance(passes_per_step, int) or isinstance(passes_per_step, bool) or passes_per_step < 1:
        raise EditSteerConfigError(f"passes_per_step must be an integer >= 1, got {passes_per_step!r}")
    src_tokens = to_tokens(source)[0] if source.dim() > 2 else source

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        T = len(sigmas) - 1
        config.check_steps(T)
        if config.budget > 1 and x.shape[0] != config.n0:
            raise EditSteerConfigError(f"the latent batch holds {x.shape[0]} candidates but config.n0 = {config.n0}")
        report = SearchReport(config=config.to_dict(), num_steps=T, passes_per_step=passes_per_step,
                              seeds=list(range(x.shape[0])), round_sizes=[x.shape[0]], nfe_measured=0)
        t_verify = 0.0
        k = config.k if config.budget > 1 else T
        s_in = x.new_ones([x.shape[0]])
        for i in range(T):
            if i == k:
                t0 = time.perf_counter()
                tokens = to_tokens(denoised)
                g = grid or core.factor_grid(tokens.shape[1])
                tok_mask = None if mask is None else core.mask_to_tokens(mask, g)
                j = core.judge(tokens, src_tokens.to(tokens), config, tok_mask)
                _fill_judgement(report, j, g)
                report.round_one = report.difficulty = j.difficulty.to_json()
                report.bucket = core.bucket(j.easy, j.easy)
                report.finalists = core.BudgetPolicy(config).finalists(j)
                report.order = list(range(len(report.finalists)))
                x = x[torch.tensor(report.finalists, device=x.device)]
                s_in = x.new_ones([x.shape[0]])
                t_verify += time.perf_counter() - t0
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            report.nfe_measured += x.shape[0] * passes_per_step
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if not report.finalists:
            report.finalists, report.order = list(range(x.shape[0])), list(range(x.shape[0]))
        p = passes_per_step
        report.nfe = config.nfe(T, report.candidates, p) if config.budget > 1 else T * report.candidates * p
        report.verify_s = t_verify
        if on_report is not None:
            on_report(report)
        return x

    return sample

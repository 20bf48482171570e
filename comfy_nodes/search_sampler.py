"""VeriLatent as a ComfyUI SAMPLER: the search loop of ``diffusers_ext.verilatent.search`` driven through ComfyUI's
own sampler objects.

:class:`VeriLatentSampler` wraps any SAMPLER (``KSamplerSelect`` -> ``euler``...) and is used by
``SamplerCustomAdvanced`` with any GUIDER and NOISE. Inside one sampling call (models loaded once, conditioning
processed once) it implements the core's ``CandidateSampler`` protocol:

* ``rollout``: the candidates' noises (candidate ``j`` = the noise ``RandomNoise(seed + j)`` gives; candidate 0 is
  the NOISE input's own) run the wrapped sampler on ``sigmas[:k+1]`` in batches of at most ``config.rollout_batch``
  (ComfyUI loads the model with memory for the batch it was given, one image; ``None``: a whole round at once);
  ``x̂0`` of the last early step comes from the sampler callback's ``denoised``;
* ``finish``: the chosen rows continue on ``sigmas[k:]`` from zero noise (in batches of at most
  ``config.rollout_batch`` as well). The first call returns
  ``x_k`` through the model's ``inverse_noise_scaling`` and the second re-applies ``noise_scaling`` with zero noise,
  as ``KSamplerAdvanced``'s leftover noise does, so a finished candidate equals a straight run of its seed with a
  single-step sampler (euler, heun...); multistep and ancestral samplers restart their history at step k.

Scoring, rounds and the budget policy are the core's (``run_search``); nothing of it is re-implemented here. The
latents are compared as the transformer's patch tokens (2x2 patches for Flux/Qwen-Image, as the diffusers adapter
does), in the model's latent space, against the edit's source latent (the ``reference_latents`` of the positive
conditioning, or an explicit LATENT).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers

from diffusers_ext.errors import EditSteerConfigError

logger = logging.getLogger("EditSteer")


def model_patch_size(model_wrap) -> int:
    dm = getattr(model_wrap.inner_model, "diffusion_model", None)
    p = getattr(dm, "patch_size", 1)
    return int(p[-1] if isinstance(p, (tuple, list)) else p)


def latent_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """ComfyUI latents ``[n, C, H, W]`` (or ``[n, C, 1, H, W]``) -> ``[n, (H/p)(W/p), C p p]`` patch tokens, in the
    layout of diffusers' ``_pack_latents`` (channel-major 2x2 patches)."""
    if x.ndim == 5:
        if x.shape[2] != 1:
            raise EditSteerConfigError(f"VeriLatent edits single images; got a video latent with {x.shape[2]} frames")
        x = x[:, :, 0]
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise EditSteerConfigError(f"the latent's size {h}x{w} is not a multiple of the model's patch size {patch}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // patch) * (w // patch), c * patch * patch)


def reference_latent(model_wrap) -> torch.Tensor | None:
    """The first ``reference_latents`` entry of the positive conditioning being sampled (unprocessed), if any."""
    for c in (getattr(model_wrap, "conds", None) or {}).get("positive", []) or []:
        refs = c.get("reference_latents")
        if refs:
            return refs[0]
    return None


@dataclass
class SearchLog:
    """Where a :class:`VeriLatentSampler` leaves the report of its latest search (shown by the report node)."""

    report: object | None = None  # diffusers_ext.verilatent.search.SearchReport
    runs: int = 0

    def summary(self) -> str:
        r = self.report
        if r is None:
            return "VeriLatent has not run yet"
        if r.interrupted:
            return "VeriLatent was interrupted"
        seeds = r.chosen_seeds
        if r.candidates == 1:
            return f"budget 1 (the plain sampler): seed {seeds[0]}, NFE {r.nfe}"
        return (f"chosen seed {seeds[0] if seeds else '?'} of {r.candidates} candidates in {r.rounds} round(s) "
                f"(sizes {r.round_sizes}); NFE {r.nfe}; difficulty {r.bucket}; region {r.region_kind} "
                f"({r.region_coverage:.0%} of the image)")


class _CountingModel:
    """The guider as the sampler sees it, counting rows per model call (measured NFE)."""

    def __init__(self, model_wrap, passes: int):
        self._m, self._passes, self.nfe = model_wrap, passes, 0

    def __call__(self, x, *args, **kwargs):
        self.nfe += int(x.shape[0]) * self._passes
        return self._m(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._m, name)


class _Progress:
    """One progress bar over the whole search (units: candidate-steps, the worst case of the budget) with latent
    previews through the callback ``SamplerCustomAdvanced`` passes (``latent_preview.prepare_callback``)."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, max(1, total), 0

    def step(self, rows: int, x0: torch.Tensor, x: torch.Tensor) -> None:
        self.done = min(self.total, self.done + rows)
        mm.throw_exception_if_processing_interrupted()
        if self.callback is not None:
            self.callback(self.done - 1, x0, x, self.total)


class _ComfyCandidates:
    """The core's ``CandidateSampler`` protocol over one ComfyUI sampling call."""

    def __init__(self, base, model_wrap, sigmas, extra_args, noise, latent_image, source_tokens, patch, grid,
                 progress: _Progress, passes: int, batch: int | None = None):
        self.base = base
        self.batch = batch
        self.model = _CountingModel(model_wrap, passes)
        self.sigmas = sigmas
        self.extra_args = extra_args
        self.noise0 = noise
        self.latent = latent_image
        self.source = source_tokens
        self.patch = patch
        self.grid = grid
        self.progress = progress
        self.passes_per_step = passes
        self.num_steps = int(sigmas.shape[-1]) - 1

    @property
    def nfe_measured(self) -> int:
        return self.model.nfe

    def _noise(self, seeds: list[int]) -> torch.Tensor:
        base_seed = int(self.extra_args.get("seed") or 0)
        out = []
        for s in seeds:
            if s == base_seed:
                out.append(self.noise0)
            else:  # exactly what RandomNoise(s).generate_noise gives for this latent
                out.append(comfy.sample.prepare_noise(self.noise0, s).to(self.noise0.device, self.noise0.dtype))
        return torch.cat(out)

    def _run(self, noise, latent, sigmas, capture_at: int | None = None):
        cap = {}

        def cb(i, x0, x, total):
            if capture_at is not None and i == capture_at:
                cap["x0"] = x0
            self.progress.step(x.shape[0], x0, x)

        out = self.base.sample(self.model, sigmas, dict(self.extra_args), cb, noise, latent, None, True)
        return out, cap.get("x0")

    def rollout(self, seeds: list[int], k: int):
        from diffusers_ext.verilatent.search import Rollout

        mm.throw_exception_if_processing_interrupted()
        noise = self._noise(seeds)
        latent = self.latent.expand(noise.shape[0], *self.latent.shape[1:])
        state, x0 = self._run(noise, latent, self.sigmas[:k + 1], capture_at=k - 1)
        return Rollout(latents=state, x0=latent_tokens(x0, self.patch), source=self.source, grid=self.grid)

    def finish(self, latents: torch.Tensor, k: int):
        from diffusers_ext.verilatent.search import Finished

        outs = []
        for rows in latents.split(self.batch or latents.shape[0]):  # rollout_batch bounds the finalists' batch too
            mm.throw_exception_if_processing_interrupted()
            outs.append(self._run(torch.zeros_like(rows), rows, self.sigmas[k:])[0])
        out = torch.cat(outs)
        return Finished(output=out, tokens=latent_tokens(out, self.patch))


class VeriLatentSampler(comfy.samplers.Sampler):
    """A SAMPLER that searches over initial noises with VeriLatent, wrapping another SAMPLER.

    ``config``: a ``VeriLatentConfig``; ``source``: an optional LATENT dict of the edit's source image (default:
    the positive conditioning's first reference latent); ``mask``: an optional MASK of the region to edit.
    """

    def __init__(self, base: comfy.samplers.Sampler, config, *, source: dict | None = None, mask=None,
                 log: SearchLog | None = None):
        self.base = base
        self.config = config
        self.source = source
        self.mask = mask
        self.log = log or SearchLog()

    def max_denoise(self, model_wrap, sigmas):
        return self.base.max_denoise(model_wrap, sigmas)

    def _source_tokens(self, model_wrap, latent_image, patch):
        src = self.source["samples"] if self.source is not None else reference_latent(model_wrap)
        if src is None:
            raise EditSteerConfigError(
                "VeriLatent needs the source image's latent to judge candidates: connect source_latent, or sample "
                "with a conditioning that carries one (ReferenceLatent for Kontext, TextEncodeQwenImageEdit with a "
                "VAE and an image for Qwen-Image-Edit)")
        model = model_wrap.inner_model
        src = src[:1].to(latent_image.device, latent_image.dtype)
        if src.ndim == 4 and latent_image.ndim == 5:
            src = src.unsqueeze(2)
        if tuple(src.shape[1:]) != tuple(latent_image.shape[1:]):
            raise EditSteerConfigError(
                f"the source latent has shape {tuple(src.shape[1:])} but the latent being sampled has "
                f"{tuple(latent_image.shape[1:])}: VeriLatent compares them token by token, so sample at the source's "
                "size (e.g. use the VAEEncode of the source image as latent_image)")
        return latent_tokens(model.process_latent_in(src), patch)[0]

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        from diffusers_ext.verilatent.search import SearchReport, run_search

        cfg = self.config
        steps = int(sigmas.shape[-1]) - 1
        seed = int(extra_args.get("seed") or 0)
        uncond = (getattr(model_wrap, "conds", None) or {}).get("negative")
        passes = 2 if uncond and not math.isclose(float(getattr(model_wrap, "cfg", 1.0)), 1.0) else 1
        if cfg.budget == 1:  # the wrapped sampler, untouched
            out = self.base.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                   disable_pbar)
            self._record(SearchReport(config=cfg.to_dict(), num_steps=steps, passes_per_step=passes, seeds=[seed],
                                      round_sizes=[1], finalists=[0], order=[0], nfe=steps * passes))
            return out
        if noise.shape[0] != 1:
            raise EditSteerConfigError(
                f"VeriLatent searches the starting noise of one image; the LATENT has a batch of {noise.shape[0]} "
                "(use a batch of 1, or budget 1)")
        if denoise_mask is not None:
            raise EditSteerConfigError("VeriLatent does not support a LATENT with a noise_mask (inpainting); remove "
                                       "the mask or use budget 1")
        cfg.check_steps(steps)
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        patch = model_patch_size(model_wrap)
        source = self._source_tokens(model_wrap, latent_image, patch)
        grid = (latent_image.shape[-2] // patch, latent_image.shape[-1] // patch)
        total = cfg.max_candidates * cfg.k + min(cfg.top_m, cfg.max_candidates) * (steps - cfg.k)
        sampler = _ComfyCandidates(self.base, model_wrap, sigmas, extra_args, noise, latent_image, source, patch,
                                   grid, _Progress(callback, total), passes, batch=cfg.rollout_batch)
        result = run_search(sampler, cfg, seed, mask=self.mask)
        self._record(result.report)
        out = result.output
        order = result.report.order
        if len(order) > 1:
            out = out[torch.tensor(order, device=out.device)]
        return out

    def _record(self, report) -> None:
        self.log.report = report
        self.log.runs += 1
        logger.info("EditSteer VeriLatent: %s", self.log.summary())

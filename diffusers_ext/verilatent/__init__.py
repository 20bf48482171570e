"""VeriLatent: try several initial noises, judge them after k early steps in latent space (no VAE decode), keep the
promising ones and spend more candidates only on hard edits (methods.md §3).

* :mod:`.config`: :class:`VeriLatentConfig`, every constant, validated.
* :mod:`.core`: activation maps, expected region, score, difficulty, budget policy (plain torch).
* :mod:`.search`: the search loop over a small sampler protocol (:class:`CandidateSampler`), and
  :class:`FlowEulerSampler`, the protocol over a plain Euler flow loop (the shape ComfyUI's SAMPLER/GUIDER reuse).
* :mod:`.diffusers_wrapper`: :class:`VeriLatentSearch` / :func:`run_verilatent` around ``FluxKontextPipeline``,
  ``QwenImageEditPipeline`` and their subclasses.
* :mod:`.bench`: ``editsteer bench verilatent`` and ``editsteer bench bon`` (decode-then-verify best-of-N).
* :mod:`.report`: the quality-vs-NFE table and plot over bench runs.
"""

from .config import VeriLatentConfig
from .search import CandidateSampler, FlowEulerSampler, Finished, Rollout, SearchInterrupted, SearchReport, run_search

__all__ = [
    "CandidateSampler",
    "Finished",
    "FlowEulerSampler",
    "Rollout",
    "SearchInterrupted",
    "SearchReport",
    "VeriLatentConfig",
    "VeriLatentOutput",
    "VeriLatentSearch",
    "run_search",
    "run_verilatent",
]


def __getattr__(name):  # the diffusers wrapper imports diffusers: load it on first use
    if name in ("VeriLatentSearch", "VeriLatentOutput", "run_verilatent"):
        from . import diffusers_wrapper

        return getattr(diffusers_wrapper, name)
    raise AttributeError(name)

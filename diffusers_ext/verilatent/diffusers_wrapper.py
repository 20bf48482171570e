"""VeriLatent around a diffusers flow-matching edit pipeline (``FluxKontextPipeline``, ``QwenImageEditPipeline`` and
any subclass whose ``__call__`` keeps the standard signature, e.g. the Inline Critic pipelines).

Only the standard call surface is used (ecosystem.md §1.7): candidates run as one batched call with a list of
generators and ``output_type="latent"``, stopped after step k by ``callback_on_step_end`` + ``_interrupt``; the chosen
ones continue in a second call with ``latents=`` and ``sigmas=full[k:]``. The predicted clean latent is recovered
from the step itself (x̂0 = x_k - sigma_k v with v = (x_k - x_{k-1}) / (sigma_k - sigma_{k-1})), and the source
latent tokens are read from the transformer's input (condition tokens follow the noisy ones), so no candidate is
ever decoded and no model pass is added. The prompt embeddings (and, for Kontext, the source image's latents) that
the first call computes are passed to the later calls (``prompt_embeds=``...); they are taken from what
``pipe.encode_prompt`` returned, not from the transformer's input, which hooks such as the Inline Critic's extend.
The pipeline's scheduler state, interrupt flag, hooks and wrapped methods are restored on every exit, errors
included.

Example::

    import torch
    from diffusers_ext.toy import world
    from diffusers_ext.toy.editor import load_toy_editor, toy_pipeline_kwargs
    from diffusers_ext.verilatent import VeriLatentConfig, VeriLatentSearch
    pipe, _ = load_toy_editor()
    case = world.make_case("heldout", seed=0, index=0)
    search = VeriLatentSearch(pipe, VeriLatentConfig.adaptive())
    out = search(image=world.to_pil(case.source), prompt=case.instruction,
                 generator=torch.Generator().manual_seed(0), output_type="np", **toy_pipeline_kwargs(pipe))
    out.images[0], out.report.chosen_seeds, out.report.nfe, out.report.bucket
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import EditSteerConfigError, EditSteerError, ModelFamilyError
from .config import VeriLatentConfig
from .core import factor_grid, predicted_clean
from .search import Finished, Rollout, SearchInterrupted, SearchReport, run_search

logger = logging.getLogger(__name__)

_REQUIRED_PARAMS = ("latents", "sigmas", "generator", "callback_on_step_end", "output_type", "num_images_per_prompt")
_CALL_STATE = ("_interrupt", "_num_timesteps", "_current_timestep", "_guidance_scale", "_joint_attention_kwargs",
               "_attention_kwargs")
_MISSING = object()


@dataclass
class VeriLatentOutput:
    """``images``: the finalists in the pipeline's ``output_type`` (best first; ``None`` when interrupted during the
    search); ``report``: seeds, scores, maps, difficulty, NFE, rounds (:class:`~.search.SearchReport`)."""

    images: Any
    report: SearchReport


def check_pipeline(pipe) -> None:
    """Raise :class:`ModelFamilyError` unless ``pipe`` is a flow-matching pipeline VeriLatent can drive."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(pipe).__name__
    sched = getattr(pipe, "scheduler", None)
    if not isinstance(sched, FlowMatchEulerDiscreteScheduler):
        raise ModelFamilyError(
            f"{name} samples with {type(sched).__name__}, not a flow-matching Euler scheduler: VeriLatent judges "
            "candidates from the flow prediction x0 = x - sigma v and resumes them with `sigmas=`; use "
            "FluxKontextPipeline, QwenImageEditPipeline (or a subclass) with FlowMatchEulerDiscreteScheduler")
    if sched.config.get("stochastic_sampling", False):
        raise ModelFamilyError(
            f"{name}'s scheduler has stochastic_sampling=True: a resumed candidate would not equal a straight run; "
            "disable stochastic sampling for VeriLatent")
    if getattr(pipe, "transformer", None) is None:
        raise ModelFamilyError(f"{name} has no `transformer`: VeriLatent needs a DiT flow-matching edit pipeline")
    params = inspect.signature(pipe.__call__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        missing = [p for p in _REQUIRED_PARAMS if p not in params]
        if missing:
            raise ModelFamilyError(
                f"{name}.__call__ lacks {missing}: VeriLatent needs the standard diffusers call surface "
                "(latents=, sigmas=, a list of generators, callback_on_step_end, output_type='latent')")


class _PipelineState:
    """Snapshot of what a search touches on the pipeline; :meth:`restore` puts it back exactly."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.scheduler_state = dict(vars(pipe.scheduler))
        self.call_state = {k: pipe.__dict__.get(k, _MISSING) for k in _CALL_STATE}
        self.handles: list = []
        self.patched: dict[str, Any] = {}

    def patch(self, name: str, fn) -> None:
        """Shadow the pipeline's method ``name`` with ``fn`` (an instance attribute, so ``self.name(...)`` inside
        ``__call__`` finds it) until :meth:`unpatch` or :meth:`restore`."""
        self.patched.setdefault(name, self.pipe.__dict__.get(name, _MISSING))
        self.pipe.__dict__[name] = fn

    def unpatch(self) -> None:
        for name, v in self.patched.items():
            if v is _MISSING:
                self.pipe.__dict__.pop(name, None)
            else:
                self.pipe.__dict__[name] = v
        self.patched.clear()

    def restore(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.unpatch()
        d = vars(self.scheduler)
        d.clear()
        d.update(self.scheduler_state)
        for k, v in self.call_state.items():
            if v is _MISSING:
                self.pipe.__dict__.pop(k, None)
            else:
                self.pipe.__dict__[k] = v


class _Tap:
    """A forward pre-hook on the transformer: the latest input tokens, the NFE (rows per pass) and the grid info.

    It runs before any other pre-hook (``prepend=True``), so it reads the pipeline's own inputs: other hooks may
    extend them (the Inline Critic appends rows to the text stream), and ``text_rows`` is the number of the
    pipeline's own text tokens, handed to the listeners (the attention map reads those rows only). ``seconds``: the
    time spent in this hook (verifier work, outside the model's forward since the hook runs first)."""

    def __init__(self, transformer, state: _PipelineState):
        self.x_in: torch.Tensor | None = None
        self.calls = 0
        self.nfe = 0
        self.first_kwargs: dict | None = None
        self.step_calls = 0
        self.text_rows: int | None = None
        self.listeners: list = []
        self.seconds = 0.0
        state.handles.append(transformer.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True))

    def _pre(self, module, args, kwargs):
        t0 = time.perf_counter()
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs is None:
            return None
        self.x_in = hs
        self.calls += 1
        self.step_calls += 1
        self.nfe += int(hs.shape[0])
        ehs = kwargs.get("encoder_hidden_states")
        self.text_rows = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else None
        if self.first_kwargs is None:
            self.first_kwargs = {"img_ids": kwargs.get("img_ids"), "img_shapes": kwargs.get("img_shapes")}
        for fn in self.listeners:
            fn(self.step_calls, self.text_rows)
        self.seconds += time.perf_counter() - t0
        return None


def _grids(first_kwargs: dict | None, n_target: int, n_total: int, aspect: float) -> tuple[tuple, tuple | None]:
    """Token grids (h, w) of the target and of the (first) condition image, from the transformer's inputs."""
    kw = first_kwargs or {}
    shapes = kw.get("img_shapes")
    if shapes:  # Qwen-Image: [[(1, h, w) target, (1, h, w) condition, ...]] * B
        s = shapes[0]
        tgt = (int(s[0][1]), int(s[0][2]))
        src = (int(s[1][1]), int(s[1][2])) if len(s) > 1 else None
        return tgt, src
    ids = kw.get("img_ids")
    if isinstance(ids, torch.Tensor):  # Flux/Kontext: [L_total, 3] (index, row, col); condition rows have index 1
        ids = ids[0] if ids.dim() == 3 else ids
        t = ids[:n_target]
        tgt = (int(t[:, 1].max()) + 1 - int(t[:, 1].min()), int(t[:, 2].max()) + 1 - int(t[:, 2].min()))
        rest = ids[n_target:]
        cond = rest[rest[:, 0] == rest[0, 0]] if rest.shape[0] else rest
        src = None
        if cond.shape[0]:
            src = (int(cond[:, 1].max()) + 1 - int(cond[:, 1].min()), int(cond[:, 2].max()) + 1 - int(cond[:, 2].min()))
            if src[0] * src[1] != cond.shape[0]:
                src = None
        if tgt[0] * tgt[1] == n_target:
            return tgt, src
    tgt = factor_grid(n_target, aspect)
    return tgt, (tgt if n_total - n_target >= n_target else None)


def _source_tokens(x_in: torch.Tensor, n_target: int, tgt: tuple, src: tuple | None) -> torch.Tensor:
    """The source image's latent tokens aligned with the target tokens ([L, C])."""
    rest = x_in[0, n_target:]
    if src is None:
        if rest.shape[0] < n_target:
            raise EditSteerError(
                "VeriLatent could not find the source image's latent tokens in the transformer input "
                f"({x_in.shape[1]} tokens for {n_target} target tokens): pass the image to edit with `image=`")
        return rest[:n_target]
    n_src = src[0] * src[1]
    tokens = rest[:n_src]
    if tuple(src) == tuple(tgt):
        return tokens
    if abs(src[1] / src[0] - tgt[1] / tgt[0]) > 0.05:
        raise EditSteerConfigError(
            f"the output's token grid {tgt[0]}x{tgt[1]} and the source image's {src[0]}x{src[1]} differ in aspect: "
            "VeriLatent compares them token by token, so edit at the source's aspect ratio: pass height= and width= "
            "with the source image's aspect (FluxKontextPipeline renders 1024x1024 unless told, whatever the "
            "input's shape)")
    grid = tokens.float().reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=tgt, mode="area")
    return grid.permute(0, 2, 3, 1).reshape(n_target, -1).to(tokens.dtype)


class _UserCallback:
    """The user's ``callback_on_step_end``, called with the global step index (resumed calls add k)."""

    def __init__(self, fn, offset: int = 0):
        self.fn, self.offset = fn, offset

    def __call__(self, pipe, i, t, kw):
        if self.fn is None:
            return kw
        out = self.fn(pipe, i + self.offset, t, kw)
        return kw if out is None else out


def _encoding_fields(pipe) -> tuple[tuple[str, str], tuple[str, str], bool] | None:
    """How a pipeline takes back what its ``encode_prompt`` returned: the keyword names of (embeddings, second
    output) for the prompt and for the negative prompt, and whether the source image can be passed as latents.
    ``None``: a pipeline family whose encodings VeriLatent does not reuse (each call encodes again, still exact)."""
    from diffusers import FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline

    if isinstance(pipe, FluxKontextPipeline):
        return (("prompt_embeds", "pooled_prompt_embeds"),
                ("negative_prompt_embeds", "negative_pooled_prompt_embeds"), True)
    if isinstance(pipe, (QwenImageEditPipeline, QwenImageEditPlusPipeline)):
        # the Qwen edit pipelines size the output and the prompt image from a PIL `image`: it cannot be passed as
        # latents, so the VAE encodes the source once per call (the text encoder, the costly part, runs once)
        return (("prompt_embeds", "prompt_embeds_mask"),
                ("negative_prompt_embeds", "negative_prompt_embeds_mask"), False)
    return None


class PipelineSampler:
    """:class:`~.search.CandidateSampler` over one diffusers edit call (see the module docstring)."""

    def __init__(self, pipe, call_kwargs: dict, state: _PipelineState, *, generator=None,
                 attention=None, reuse_encodings: bool = True):
        self.pipe = pipe
        self.state = state
        self.kwargs = dict(call_kwargs)
        self.user_generator = generator
        self.user_callback = self.kwargs.pop("callback_on_step_end", None)
        inputs = list(self.kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
        self.tensor_inputs = inputs if "latents" in inputs else ["latents", *inputs]
        self.output_type = self.kwargs.pop("output_type", "pil")
        self.kwargs.pop("return_dict", None)
        self.sigmas, self.num_steps = _schedule(pipe, self.kwargs)
        # the schedule of a plain call (the user's own sigmas / steps, passed through unchanged)
        self.schedule_kwargs = {"num_inference_steps": self.num_steps}
        user_sigmas = self.kwargs.pop("sigmas", None)
        self.kwargs.pop("num_inference_steps", None)
        if user_sigmas is not None:
            self.schedule_kwargs["sigmas"] = user_sigmas
        self.tap = _Tap(pipe.transformer, state)
        self.attention = attention
        if attention is not None:
            attention.install(pipe.transformer, state)
            self.tap.listeners.append(attention.on_forward)
        self.passes_per_step = 1
        self._overhead_s = 0.0
        self.schedule: torch.Tensor | None = None
        self.base_seed: int | None = None
        self.interrupted = False
        self.reuse = reuse_encodings
        self.reused = False
        self.notes: list[str] = []

    @property
    def nfe_measured(self) -> int:
        return self.tap.nfe

    @property
    def overhead_s(self) -> float:
        """Verifier time outside model calls: the step callbacks, the encodings' bookkeeping and the input tap."""
        return self._overhead_s + self.tap.seconds

    @property
    def capture_s(self) -> float:
        """Verifier time spent inside model calls (the attention capture hooks, within the transformer's forward)."""
        return self.attention.seconds if self.attention is not None else 0.0

    def _generator(self, seed: int):
        if self.user_generator is not None and seed == self.base_seed:
            return self.user_generator  # candidate 0 is the plain call's own generator
        device = self.user_generator.device if self.user_generator is not None else "cpu"
        return torch.Generator(device).manual_seed(int(seed))

    def _aspect(self) -> float:
        h, w = self.kwargs.get("height"), self.kwargs.get("width")
        return (w / h) if h and w else 1.0

    def _observe(self, x_in: torch.Tensor, latents: torch.Tensor, sigma_prev: float, sigma_next: float):
        """x̂0 of the step that took the transformer input ``x_in`` to ``latents``, the token grid and the source
        tokens aligned with it (raises :class:`EditSteerError` when the source cannot be compared)."""
        n_target = latents.shape[1]
        x0 = predicted_clean(x_in[:, :n_target], latents, sigma_prev, sigma_next)
        tgt, src = _grids(self.tap.first_kwargs, n_target, x_in.shape[1], self._aspect())
        return x0, tgt, _source_tokens(x_in, n_target, tgt, src)

    # -- encodings computed once ---------------------------------------------------------------------------------
    def _record_encodings(self) -> dict | None:
        """Before the first rollout: wrap ``pipe.encode_prompt`` (and, for Kontext, ``pipe._encode_vae_image``) so
        that what they return is kept; unwrapped right after that call."""
        fields = _encoding_fields(self.pipe) if self.reuse and not self.reused else None
        if fields is None:
            return None
        rec: dict[str, list] = {"encode_prompt": [], "_encode_vae_image": []}
        names = ["encode_prompt"] + (["_encode_vae_image"] if fields[2] else [])
        for name in names:
            orig = getattr(self.pipe, name, None)
            if orig is None:
                continue

            def recorder(*a, _orig=orig, _out=rec[name], **k):
                out = _orig(*a, **k)
                _out.append(out)
                return out

            self.state.patch(name, recorder)
        return rec

    def _reuse_encodings(self, rec: dict) -> None:
        """After the first rollout, pass the prompt embeddings (and negatives) that ``encode_prompt`` returned in it,
        and for Kontext the source image's latents, to every later call (ecosystem.md §1.8), so that the text
        encoders and the VAE encoder run once per edit. They are the values the pipeline computed itself (taken
        from the encoder's return value, not from the transformer's input, which other hooks may extend), so later
        calls see bit-identical inputs. Anything unexpected (another number of encode calls than passes per step,
        another return shape) leaves the calls as they were: they encode again."""
        self.reused = True
        pos, neg, image_ok = _encoding_fields(self.pipe)
        calls = rec["encode_prompt"]
        if len(calls) != self.passes_per_step or len(calls) > 2:
            return
        new: dict[str, Any] = {}
        for out, (emb_name, extra_name) in zip(calls, (pos, neg)):
            if not isinstance(out, tuple) or len(out) < 2 or not isinstance(out[0], torch.Tensor):
                return
            emb, extra = out[0][:1], out[1]
            if extra is None and extra_name.endswith("mask"):  # Qwen returns an all-valid mask as None
                extra = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
            if not isinstance(extra, torch.Tensor):
                return
            new[emb_name], new[extra_name] = emb, extra[:1]
        images = rec["_encode_vae_image"]
        if image_ok and len(images) == 1 and isinstance(images[0], torch.Tensor) and images[0].shape[0] == 1 \
                and images[0].dtype == new[pos[0]].dtype:  # prepare_latents casts image= to the embeddings' dtype
            new["image"] = images[0]
        for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
            self.kwargs.pop(name, None)
        self.kwargs.update(new)

    def _attention_map(self, n_target: int) -> torch.Tensor | None:
        if self.attention is None:
            return None
        att = self.attention.result()
        if att is None:
            raise EditSteerError(
                "no attention was captured during the early steps (the transformer's processors do not call the "
                "QK-norm modules); use VeriLatentConfig(activation='latent')")
        return att[:, :n_target]

    # -- early rollout ---------------------------------------------------------------------------------------------
    def rollout(self, seeds: list[int], k: int) -> Rollout:
        pipe, cap = self.pipe, {}
        user = _UserCallback(self.user_callback)
        if self.attention is not None:
            self.attention.start(len(seeds))

        def callback(p, i, t, kw):
            t0 = time.perf_counter()
            if i == 0:
                self.passes_per_step = max(1, self.tap.step_calls)
            self.tap.step_calls = 0
            if i == k - 1:
                sig, si = p.scheduler.sigmas, p.scheduler.step_index
                cap["x0"], cap["grid"], cap["source"] = self._observe(
                    self.tap.x_in, kw["latents"], float(sig[si - 1]), float(sig[si]))
                self.schedule = sig.detach().clone()
            self._overhead_s += time.perf_counter() - t0
            kw = user(p, i, t, kw)
            if p._interrupt:
                raise SearchInterrupted("interrupted by the user's callback while judging candidates")
            if i == k - 1:
                cap["latents"] = kw["latents"]
                p._interrupt = True  # the rest of the loop makes no model call
            return kw

        rec = self._record_encodings()
        try:
            pipe(**self.kwargs, **self.schedule_kwargs, generator=[self._generator(s) for s in seeds],
                 num_images_per_prompt=len(seeds),
                 callback_on_step_end=callback, callback_on_step_end_tensor_inputs=self.tensor_inputs,
                 output_type="latent", return_dict=True)
        finally:
            if rec is not None:
                self.state.unpatch()
        if "latents" not in cap:
            raise EditSteerError(f"{type(pipe).__name__} stopped before step {k}: no candidate state to judge")
        t0 = time.perf_counter()
        att = self._attention_map(cap["x0"].shape[1])
        if rec is not None:
            self._reuse_encodings(rec)
        self._overhead_s += time.perf_counter() - t0
        return Rollout(cap["latents"], cap["x0"], cap["source"], att, cap["grid"])

    # -- continuation ----------------------------------------------------------------------------------------------
    def finish(self, latents: torch.Tensor, k: int) -> Finished:
        pipe, cap = self.pipe, {}
        user = _UserCallback(self.user_callback, offset=k)
        expected = self.schedule[k:] if self.schedule is not None else None
        last = self.num_steps - k - 1
        if self.attention is not None:
            self.attention.stop()

        def callback(p, i, t, kw):
            if i == 0 and expected is not None:
                got = p.scheduler.sigmas
                if got.shape != expected.shape or not torch.allclose(got.cpu().double(), expected.cpu().double(),
                                                                     atol=1e-6):
                    raise EditSteerError(
                        f"{type(p).__name__} resumed on another schedule than the one it started on; VeriLatent needs "
                        "the standard flow-matching sigma convention (np.linspace(1, 1/T, T) shifted elementwise)")
            kw = user(p, i, t, kw)
            if p._interrupt:
                self.interrupted = True
            if i == last:
                cap["tokens"] = kw["latents"]
            return kw

        out = pipe(**self.kwargs, latents=latents, num_images_per_prompt=latents.shape[0],
                   sigmas=list(self.sigmas[k:]), num_inference_steps=self.num_steps - k, generator=None,
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=self.tensor_inputs,
                   output_type=self.output_type, return_dict=True)
        return Finished(out.images, cap.get("tokens"))

    # -- budget 1 ----------------------------------------------------------------------------------------------------
    def single(self, seed: int, k: int) -> tuple[Finished, Rollout | None]:
        """The plain call, untouched; the step-k prediction is read on the way (no extra model pass).

        The step-k map is a by-product here: when it cannot be made (the output's token grid and the source's differ
        in aspect, no source image, no attention captured...) the run still returns the plain result, with no map
        and the reason in ``notes`` (the parity rule, methods.md §5)."""
        pipe, cap = self.pipe, {}
        user = _UserCallback(self.user_callback)
        observe = 1 <= k < self.num_steps

        def callback(p, i, t, kw):
            t0 = time.perf_counter()
            if i == 0:
                self.passes_per_step = max(1, self.tap.step_calls)
            if observe and i == k - 1:  # keep the raw tensors only; nothing here may fail the plain run
                sig, si = p.scheduler.sigmas, p.scheduler.step_index
                cap.update(x_in=self.tap.x_in, latents=kw["latents"], sigmas=(float(sig[si - 1]), float(sig[si])))
            self.tap.step_calls = 0
            self._overhead_s += time.perf_counter() - t0
            kw = user(p, i, t, kw)
            if p._interrupt:
                self.interrupted = True
            return kw

        if self.attention is not None:
            self.attention.start(1, steps=k)
        out = pipe(**self.kwargs, **self.schedule_kwargs, generator=self._generator(seed),
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=self.tensor_inputs,
                   output_type=self.output_type, return_dict=True)
        ro = None
        if "x_in" in cap:
            t0 = time.perf_counter()
            try:
                x0, grid, source = self._observe(cap["x_in"], cap["latents"], *cap["sigmas"])
                ro = Rollout(cap["latents"], x0, source, self._attention_map(x0.shape[1]), grid)
            except EditSteerError as e:
                self.notes.append(f"no step-{k} map for this budget-1 run (the image is the plain pipeline's): {e}")
                logger.info("VeriLatent: %s", self.notes[-1])
            self._overhead_s += time.perf_counter() - t0
        return Finished(out.images), ro


def _schedule(pipe, kwargs: dict) -> tuple[list[float], int]:
    """The unshifted sigmas of the call (the user's, or the pipelines' np.linspace(1, 1/T, T)) and T."""
    sigmas = kwargs.get("sigmas")
    if sigmas is not None:
        s = [float(x) for x in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
        return s, len(s)
    steps = kwargs.get("num_inference_steps")
    if steps is None:
        p = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
        steps = p.default if p is not None and p.default is not inspect.Parameter.empty else 28
    steps = int(steps)
    if steps < 1:
        raise EditSteerConfigError(f"num_inference_steps must be >= 1, got {steps}")
    return [float(x) for x in np.linspace(1.0, 1.0 / steps, steps)], steps


def _seed_and_generator(kwargs: dict, seed: int | None):
    gen = kwargs.pop("generator", None)
    if isinstance(gen, (list, tuple)):
        if len(gen) != 1:
            raise EditSteerConfigError(
                f"VeriLatent edits one image per call and draws its own candidate generators: pass one generator "
                f"(or seed=), not a list of {len(gen)}")
        gen = gen[0]
    if gen is not None and not isinstance(gen, torch.Generator):
        raise EditSteerConfigError(f"generator must be a torch.Generator, got {type(gen).__name__}")
    if gen is not None and seed is not None:
        raise EditSteerConfigError("pass either generator= or seed=, not both")
    if gen is not None:
        return int(gen.initial_seed()), gen
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int(seed), None


def _check_call(kwargs: dict) -> None:
    if kwargs.get("latents") is not None:
        raise EditSteerConfigError(
            "VeriLatent draws its candidates' initial noise itself (candidate j: seed + j); pass generator= or "
            "seed= instead of latents=")
    n = kwargs.pop("num_images_per_prompt", None)
    if n not in (None, 1):
        raise EditSteerConfigError(
            f"num_images_per_prompt={n}: VeriLatent returns its top_m finalists; set VeriLatentConfig(top_m=...) "
            "instead")
    prompt = kwargs.get("prompt")
    if isinstance(prompt, (list, tuple)) and len(prompt) != 1:
        raise EditSteerConfigError(f"VeriLatent edits one image per call; got {len(prompt)} prompts")
    pe = kwargs.get("prompt_embeds")
    if prompt is None and isinstance(pe, torch.Tensor) and pe.shape[0] != 1:
        raise EditSteerConfigError(f"VeriLatent edits one image per call; got prompt_embeds of batch {pe.shape[0]}")
    image = kwargs.get("image")
    if isinstance(image, (list, tuple)) and len(image) > 1:
        raise EditSteerConfigError(f"VeriLatent edits one image per call; got {len(image)} images")


def _reorder(images, order: list[int]):
    if images is None or order == list(range(len(order))):
        return images
    if isinstance(images, list):
        return [images[i] for i in order]
    return images[list(order)] if isinstance(images, np.ndarray) else images[torch.tensor(order)]


class VeriLatentSearch:
    """Run a diffusers edit pipeline with VeriLatent's early-step latent verification and adaptive budget.

    ``VeriLatentSearch(pipe, config)(**pipe_call_kwargs, mask=None, seed=None)`` takes the pipeline's own call
    arguments (one edit: ``image``, ``prompt`` or ``prompt_embeds``, ``num_inference_steps``, ``generator``...) and
    returns :class:`VeriLatentOutput`. Candidate j starts from seed ``s + j`` where ``s`` is ``seed`` or the
    ``generator``'s initial seed; candidate 0 uses the given generator itself, so a budget of 1 (the default
    config) is exactly the plain call. ``mask`` (optional, H x W at the output size or the token grid) tells where
    the edit should happen and replaces the candidates' consensus.

    Example::

        search = VeriLatentSearch(pipe, VeriLatentConfig.adaptive(k=2))
        out = search(image=img, prompt="make the red circle blue", num_inference_steps=28,
                     generator=torch.Generator().manual_seed(0))
        out.images[0].save("edit.png"); print(out.report.to_json())
    """

    def __init__(self, pipe, config: VeriLatentConfig | None = None):
        check_pipeline(pipe)
        if config is not None and not isinstance(config, VeriLatentConfig):
            raise EditSteerConfigError(f"config must be a VeriLatentConfig, got {type(config).__name__}")
        self.pipe = pipe
        self.config = config or VeriLatentConfig()

    def __call__(self, *, mask=None, seed: int | None = None, **call_kwargs) -> VeriLatentOutput:
        cfg = self.config
        kwargs = dict(call_kwargs)
        _check_call(kwargs)
        base_seed, generator = _seed_and_generator(kwargs, seed)
        _, steps = _schedule(self.pipe, kwargs)
        cfg.check_steps(steps)
        state = _PipelineState(self.pipe)
        try:
            attention = None
            if cfg.activation != "latent":
                from .attention import AttentionCapture, double_stream_attentions

                if cfg.activation == "attention" or double_stream_attentions(self.pipe.transformer):
                    attention = AttentionCapture(cfg.attention_layers)
                else:  # "mix" on a transformer without double-stream QK-norm attention: the latent map alone
                    logger.warning("%s has no double-stream attention to read: VeriLatent scores with the latent "
                                   "map only", type(self.pipe.transformer).__name__)
            sampler = PipelineSampler(self.pipe, kwargs, state, generator=generator, attention=attention)
            sampler.base_seed = base_seed
            rounds_max = 1 + max(0, -(-(cfg.max_candidates - cfg.n0) // cfg.round_size))
            with self.pipe.progress_bar(total=rounds_max + 1) as bar:
                def on_event(name, info):
                    bar.update(1 if name == "round" else max(0, bar.total - bar.n))
                result = run_search(sampler, cfg, base_seed, mask=mask, on_event=on_event)
            result.report.interrupted = result.report.interrupted or sampler.interrupted
            images = _reorder(result.output, result.report.order) if result.output is not None else None
            return VeriLatentOutput(images, result.report)
        finally:
            state.restore()


def run_verilatent(pipe, config: VeriLatentConfig | None = None, *, mask=None, seed: int | None = None,
                   **call_kwargs) -> VeriLatentOutput:
    """Functional form of :class:`VeriLatentSearch`: ``run_verilatent(pipe, cfg, image=..., prompt=...)``."""
    return VeriLatentSearch(pipe, config)(mask=mask, seed=seed, **call_kwargs)

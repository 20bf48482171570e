"""diffusers pipelines with an Inline Critic: FLUX.1 Kontext and Qwen-Image-Edit subclasses.

Both take a critic (an :class:`InlineCritic`, a local folder, a ``critic.safetensors`` file, a manifest id or a Hub
repo id) at construction (``critic=``, also through ``from_pretrained``/``from_pipe``/``custom_pipeline``) or with
:meth:`load_critic`, run it in the chosen mode during their own calls only, and return the critic's error map with
the images. Built without ``critic=`` on a transformer that already carries one (``from_pipe(pipe_with_critic)``),
a pipeline uses that critic with the mode and scale it was loaded with (``critic_mode=``/``critic_scale=`` override
them).

The critic rests in ``off`` mode on the shared transformer between calls, so a plain pipeline built on the same
transformer (``FluxKontextPipeline.from_pipe(pipe)``) still runs the frozen model.

Two ways to use them::

    # 1. import the subclass
    from diffusers_ext.critic import InlineCriticKontextPipeline
    pipe = InlineCriticKontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev",
                                                       critic="org/my-kontext-critic", dtype=torch.bfloat16)
    # 2. diffusers' custom_pipeline, pointing at the pack's shim file (needs `import diffusers_ext` to work)
    from diffusers import DiffusionPipeline
    from diffusers_ext.critic import shim_path
    pipe = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev",
                                             custom_pipeline=str(shim_path("kontext")), trust_remote_code=True,
                                             critic="org/my-kontext-critic")
    out = pipe(image=image, prompt="make the cat blue", critic_mode="steer")
    out.images[0], out.error_maps[0]            # PIL image, (h/16, w/16) predicted error map
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.utils import BaseOutput
from transformers import (  # the parents' component types (from_pipe and from_pretrained check them)
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..errors import EditSteerConfigError
from .apply import apply_inline_critic, describe_transformer, installed_critic
from .config import check_mode
from .module import InlineCritic

SHIMS = {"kontext": "kontext", "flux-kontext": "kontext", "qwen": "qwen", "qwen-image-edit": "qwen"}


def shim_path(kind: str = "kontext") -> Path:
    """The shim file to pass as ``custom_pipeline=`` (``"kontext"`` or ``"qwen"``).

    It is ``shims/<kind>/editsteer_critic_<kind>.py``: diffusers imports a local custom pipeline as
    ``diffusers_modules.local.<file name>``, so a unique name keeps it apart from other shims loaded in the same
    process (two folders' ``pipeline.py`` would collide). The folder (``shim_path(kind).parent``) also holds the same
    code as ``pipeline.py`` for diffusers' folder form.
    """
    if kind not in SHIMS:
        raise EditSteerConfigError(f"unknown shim {kind!r}; known: {', '.join(sorted(set(SHIMS.values())))}")
    k = SHIMS[kind]
    return Path(__file__).resolve().parent / "shims" / k / f"editsteer_critic_{k}.py"


@dataclass
class InlineCriticPipelineOutput(BaseOutput):
    """Images plus the critic's prediction of where the frozen editor errs.

    Args:
        images: as the parent pipeline returns them (PIL list, numpy array, or latents).
        error_maps: ``(batch, h, w)`` float32 tensor on CPU: the critique head's predicted log-normalised error per
            target token (``h, w`` = latent token grid, 1/16 of the image side for FLUX/Qwen), averaged over the
            denoising steps (conditional pass). ``None`` when no critic is loaded or the mode is ``off``.
        step_error_maps: ``(steps, batch, h, w)``: the same map at every denoising step.
    """

    images: object
    error_maps: torch.Tensor | None = None
    step_error_maps: torch.Tensor | None = None


def conditional_maps(records) -> torch.Tensor | None:
    """``(steps, B, h, w)`` from a session's records: the first forward of every timestep (the conditional pass;
    both pipelines run the negative pass second)."""
    maps, last_t = [], object()
    for r in records:
        if r.timestep != last_t and r.error_map is not None:
            maps.append(r.error_map)
        last_t = r.timestep
    return torch.stack(maps) if maps else None


def error_map_image(error_map, size: int | tuple[int, int] | None = None, vmax: float | None = None) -> np.ndarray:
    """A uint8 ``HxWx3`` heat map (black -> red -> yellow -> white) of one ``(h, w)`` error map, nearest-upscaled to
    ``size``; ``vmax`` defaults to the map's maximum."""
    m = torch.as_tensor(error_map).detach().float().cpu().numpy()
    hi = float(vmax if vmax is not None else max(m.max(), 1e-8))
    x = np.clip(m / hi, 0, 1)
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    img = (rgb * 255).round().astype(np.uint8)
    if size is not None:
        sh, sw = (size, size) if isinstance(size, int) else size
        ys = (np.arange(sh) * img.shape[0] // sh)
        xs = (np.arange(sw) * img.shape[1] // sw)
        img = img[ys][:, xs]
    return img


class _CriticPipelineMixin:
    """Critic loading and the per-call mode switch shared by the two pipelines."""

    critic_mode: str = "off"
    critic_scale: float | None = None

    def _init_critic(self, critic, critic_mode, critic_scale) -> None:
        self.critic_mode, self.critic_scale = "off", None
        if critic is not None:
            self.load_critic(critic, mode=critic_mode, scale=critic_scale)
            return
        handle = installed_critic(self.transformer) if getattr(self, "transformer", None) is not None else None
        if handle is not None:  # from_pipe(pipe_with_critic): the shared transformer's critic, with its settings
            mode = critic_mode if critic_mode is not None else (handle.pipeline_mode or handle.mode)
            self.critic_mode = check_mode(mode)
            self.critic_scale = critic_scale if critic_scale is not None else handle.pipeline_scale
        elif critic_mode is not None and check_mode(critic_mode) != "off":
            raise EditSteerConfigError(f"critic_mode={critic_mode!r} but no critic is given or installed on the "
                                       "transformer; pass critic= as well")

    @property
    def critic(self) -> InlineCritic | None:
        h = installed_critic(self.transformer) if getattr(self, "transformer", None) is not None else None
        return None if h is None else h.critic

    def load_critic(self, critic, mode: str | None = None, scale: float | None = None, *,
                    allow_download: bool | None = None) -> InlineCritic:
        """Install ``critic`` on this pipeline's transformer; ``mode`` (default: the critic's configured mode) is
        used by this pipeline's calls. Replaces a critic installed before. Returns the :class:`InlineCritic`.

        Example::

            pipe.load_critic("toy-critic", mode="steer")
        """
        if not isinstance(critic, InlineCritic):
            critic = InlineCritic.from_pretrained(critic, allow_download=allow_download)
        mode = check_mode(critic.config.mode if mode is None else mode)
        critic.check_compatible(describe_transformer(self.transformer), where="this pipeline's transformer")
        old = installed_critic(self.transformer)
        if old is not None:
            old.remove()
        try:
            handle = apply_inline_critic(self.transformer, critic, mode="off", scale=scale)
        except BaseException:
            if old is not None:  # leave the pipeline as it was
                back = apply_inline_critic(self.transformer, old.critic, mode=old.mode, scale=old.scale)
                back.pipeline_mode, back.pipeline_scale = old.pipeline_mode, old.pipeline_scale
            raise
        handle.pipeline_mode, handle.pipeline_scale = mode, scale
        self.critic_mode, self.critic_scale = mode, scale
        return critic

    def unload_critic(self) -> None:
        """Remove the critic: the transformer is exactly the frozen model again."""
        h = installed_critic(self.transformer)
        if h is not None:
            h.remove()
        self.critic_mode, self.critic_scale = "off", None

    def _critic_call(self, parent_call, args, kwargs, critic_mode, critic_scale):
        return_dict = kwargs.pop("return_dict", True)
        handle = installed_critic(self.transformer)
        mode = check_mode(critic_mode if critic_mode is not None else self.critic_mode)
        if handle is None:
            if mode != "off":
                raise EditSteerConfigError(f"critic_mode={mode!r} but no critic is loaded; call "
                                           "pipe.load_critic(...) or pass critic= when building the pipeline")
            out = parent_call(*args, return_dict=True, **kwargs)
            maps = None
        else:
            scale = critic_scale if critic_scale is not None else self.critic_scale
            with handle.session(mode=mode, scale=scale) as records:
                out = parent_call(*args, return_dict=True, **kwargs)
            maps = conditional_maps(records)
        result = InlineCriticPipelineOutput(images=out.images, error_maps=None if maps is None else maps.mean(0),
                                            step_error_maps=maps)
        if not return_dict:
            return (result.images, result.error_maps)
        return result


class InlineCriticKontextPipeline(_CriticPipelineMixin, FluxKontextPipeline):
    r"""``FluxKontextPipeline`` with an Inline Critic.

    Extra ``__init__`` arguments: ``critic`` (object, folder, file, manifest id or Hub repo id), ``critic_mode``
    (default: the critic's), ``critic_scale``. Extra ``__call__`` arguments: ``critic_mode``, ``critic_scale``
    (per call). Returns :class:`InlineCriticPipelineOutput` (``return_dict=False``: ``(images, error_maps)``).

    Example::

        from diffusers_ext.critic import InlineCriticKontextPipeline
        from diffusers_ext.toy.editor import load_toy_editor, toy_pipeline_kwargs
        from diffusers_ext.toy import world
        pipe, _ = load_toy_editor(pipeline_cls=InlineCriticKontextPipeline)
        pipe.load_critic("toy-critic", mode="steer")
        case = world.make_case("heldout", seed=0, index=0)
        out = pipe(image=world.to_pil(case.source), prompt=case.instruction, **toy_pipeline_kwargs(pipe))
        out.images[0], out.error_maps[0]
    """

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder: CLIPVisionModelWithProjection = None,
                 feature_extractor: CLIPImageProcessor = None, critic=None, critic_mode: str | None = None,
                 critic_scale: float | None = None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._init_critic(critic, critic_mode, critic_scale)

    @torch.no_grad()
    def __call__(self, *args, critic_mode: str | None = None, critic_scale: float | None = None, **kwargs):
        """``FluxKontextPipeline.__call__`` plus ``critic_mode`` / ``critic_scale``; see the class docstring."""
        return self._critic_call(super().__call__, args, kwargs, critic_mode, critic_scale)


class InlineCriticQwenEditPipeline(_CriticPipelineMixin, QwenImageEditPipeline):
    r"""``QwenImageEditPipeline`` with an Inline Critic (same extra arguments as
    :class:`InlineCriticKontextPipeline`). True CFG (``true_cfg_scale > 1`` with a negative prompt) runs the critic
    in both passes; the returned map is the conditional pass's.

    Example::

        pipe = InlineCriticQwenEditPipeline.from_pretrained("Qwen/Qwen-Image-Edit", critic="org/my-qwen-critic",
                                                            dtype=torch.bfloat16).to("cuda")
        out = pipe(image=image, prompt="make the sky pink", negative_prompt=" ", true_cfg_scale=4.0)
    """

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKLQwenImage,
                 text_encoder: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer,
                 processor: Qwen2VLProcessor, transformer: QwenImageTransformer2DModel, critic=None,
                 critic_mode: str | None = None, critic_scale: float | None = None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         processor=processor, transformer=transformer)
        self._init_critic(critic, critic_mode, critic_scale)

    @torch.no_grad()
    def __call__(self, *args, critic_mode: str | None = None, critic_scale: float | None = None, **kwargs):
        """``QwenImageEditPipeline.__call__`` plus ``critic_mode`` / ``critic_scale``; see the class docstring."""
        return self._critic_call(super().__call__, args, kwargs, critic_mode, critic_scale)

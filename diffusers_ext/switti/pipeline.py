"""Plain text-to-image Switti as a diffusers ``DiffusionPipeline``.

The sampling loop follows the official ``SwittiPipeline.__call__`` (``yandex-research/switti``,
``models/pipeline.py``): per scale, the transformer predicts the scale's token logits from the accumulated features
of the coarser scales; classifier-free guidance ``(1 + t) z_pos - t z_neg`` with ``t = cfg * k / (K - 1)`` inside
the window ``turn_on_cfg_start_si <= k < turn_off_cfg_start_si``; soft Gumbel sampling (``more_smooth``) from
``smooth_start_si`` while guidance is on, top-k / top-p sampling otherwise; logits divided by ``last_scale_temp``
once guidance is off.

Example::

    from diffusers_ext.switti import SwittiPipeline
    from diffusers_ext.weights import resolve
    pipe = SwittiPipeline.from_pretrained(resolve("toy-switti").path)      # bundled toy model, 32 px
    image = pipe("a large red circle at the center on a black background", seed=0).images[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..errors import EditSteerConfigError
from .backbone import SwittiBackbone
from .sampling import gumbel_softmax, gumbel_tau, sample_top_k_top_p
from .text import PromptEncoding, encode_prompts
from .transformer import SwittiTransformer
from .vqvae import SwittiVQVAE


@dataclass
class SwittiPipelineOutput(BaseOutput):
    """``images``: PIL images, a (B, H, W, 3) array in [0, 1], or a (B, 3, H, W) tensor in [0, 1]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def postprocess(images: torch.Tensor, output_type: str):
    """Images in [-1, 1] (B, 3, H, W) -> the requested output type (values in [0, 1])."""
    x = images.float().add(1).div(2).clamp(0, 1)
    if output_type == "pt":
        return x
    arr = x.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    if output_type == "pil":
        return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise EditSteerConfigError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


class SwittiPipeline(DiffusionPipeline):
    """Text-to-image with Switti (scale-wise VAR transformer + multi-scale residual VQ-VAE + CLIP-L / bigG).

    Build it from this pack's diffusers layout with ``from_pretrained``, or from the official Hub repos with
    :meth:`from_switti_checkpoints`.
    """

    # No model_cpu_offload_seq: accelerate's offload hooks wrap ``forward``, and the sampler calls the transformer's
    # and VQ-VAE's per-scale methods instead, so ``enable_model_cpu_offload`` refuses (diffusers' own error) rather
    # than failing mid-run on a device mismatch. In bf16 the weights take about 7 GB of GPU memory.
    _optional_components = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(self, transformer: SwittiTransformer, vqvae: SwittiVQVAE, text_encoder, tokenizer, text_encoder_2,
                 tokenizer_2):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self._interrupt = False

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_switti_checkpoints(cls, transformer: str = "yresearch/Switti", vqvae: str = "yresearch/VQVAE-Switti",
                                text_encoder: str = "openai/clip-vit-large-patch14",
                                text_encoder_2: str = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", *,
                                dtype: torch.dtype | None = None, allow_download: bool | None = None,
                                torch_dtype: torch.dtype | None = None):
        """Assemble the pipeline from the official repos (or local folders in their layout), local first.
        ``torch_dtype`` is the deprecated alias of ``dtype``, as in diffusers.

        Example::

            pipe = SwittiPipeline.from_switti_checkpoints("yresearch/Switti-1024", dtype=torch.bfloat16)
        """
        from .loading import load_text_encoders, load_transformer, load_vqvae, resolve_dtype
        from .schedules import RESOLUTION_PATCH_NUMS

        dtype = resolve_dtype(dtype, torch_dtype)
        t = load_transformer(transformer, dtype=dtype, allow_download=allow_download)
        reso = next((r for r, p in RESOLUTION_PATCH_NUMS.items() if tuple(p) == t.patch_nums), None)
        v = load_vqvae(vqvae, reso=reso, dtype=dtype, allow_download=allow_download)
        tok, te, tok2, te2 = load_text_encoders(text_encoder, text_encoder_2, dtype=dtype,
                                                allow_download=allow_download)
        return cls(transformer=t, vqvae=v, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)

    # -- properties --------------------------------------------------------------------------------------------

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.transformer.patch_nums)

    @property
    def resolution(self) -> int:
        """Output side in pixels: last token grid x VQ-VAE downsample (512 / 1024 for the official models)."""
        return self.patch_nums[-1] * self.vqvae.downsample

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- prompts -----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], device=None) -> PromptEncoding:
        """Encode prompts with both CLIP text encoders (context, pooled vector, padding bias, token ids)."""
        return encode_prompts(prompt, self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                              device or self._execution_device)

    def prepare_conditioning(self, groups: list[PromptEncoding]):
        """One :class:`SwittiConditioning` with the groups stacked in order (e.g. [positive; negative])."""
        embeds = torch.cat([g.embeds for g in groups])
        pooled = torch.cat([g.pooled for g in groups])
        bias = torch.cat([g.bias for g in groups])
        size = (self.resolution, self.resolution)
        return self.transformer.prepare_conditioning(embeds, pooled, bias, size)

    def check_inputs(self, prompt, negative_prompt, guidance_scale, top_k, top_p, turn_on, turn_off, smooth_start):
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise EditSteerConfigError("prompt must be a string or a non-empty list of strings")
        if isinstance(negative_prompt, list) and isinstance(prompt, list) and len(negative_prompt) != len(prompt):
            raise EditSteerConfigError(f"{len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        K = len(self.patch_nums)
        if guidance_scale < 0:
            raise EditSteerConfigError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if top_k < 0 or not 0 <= top_p <= 1:
            raise EditSteerConfigError(f"top_k must be >= 0 and top_p in [0, 1], got {top_k}, {top_p}")
        for name, v in (("turn_on_cfg_start_si", turn_on), ("turn_off_cfg_start_si", turn_off),
                        ("smooth_start_si", smooth_start)):
            if not 0 <= v <= K:
                raise EditSteerConfigError(f"{name} must be a scale index in [0, {K}], got {v}")

    # -- sampling ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 6.0,
        top_k: int = 400,
        top_p: float = 0.95,
        more_smooth: bool = True,
        smooth_start_si: int = 2,
        turn_on_cfg_start_si: int = 0,
        turn_off_cfg_start_si: int | None = None,
        last_scale_temp: float | None = 0.1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        reseed_every_scale: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        prompt_encoding: PromptEncoding | None = None,
        negative_prompt_encoding: PromptEncoding | None = None,
    ) -> SwittiPipelineOutput | tuple:
        r"""Generate images from prompts.

        Args:
            prompt: text prompt(s).
            negative_prompt: the CFG negative (official default: the empty prompt).
            guidance_scale: ``cfg``; the guidance at scale k is ``cfg * k / (K - 1)``.
            top_k, top_p: filtering for hard sampling.
            more_smooth, smooth_start_si: soft Gumbel sampling from this scale while guidance is on.
            turn_on_cfg_start_si, turn_off_cfg_start_si: guidance window ``[on, off)``; ``off`` defaults to K - 1
                (no guidance on the last scale, as the MLN presets). The official README uses 11 for Switti-1024.
            last_scale_temp: logit temperature once guidance is off.
            seed / generator: randomness (``generator`` wins); ``reseed_every_scale`` re-seeds it with the same seed
                at every scale (what MLN does).
            callback_on_step_end: ``fn(pipe, scale_index, None, {"f_hat": f_hat}) -> dict`` after every scale.
            prompt_encoding, negative_prompt_encoding: pre-computed :class:`PromptEncoding` (skips the text
                encoders, which may then be None).

        Examples::

            pipe = SwittiPipeline.from_switti_checkpoints("yresearch/Switti")
            image = pipe("a photo of a cat on rocks near the ocean", seed=42, guidance_scale=6).images[0]
        """
        K = len(self.patch_nums)
        off = K - 1 if turn_off_cfg_start_si is None else turn_off_cfg_start_si
        self.check_inputs(prompt, negative_prompt, guidance_scale, top_k, top_p, turn_on_cfg_start_si, off,
                          smooth_start_si)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        B = len(prompts)
        device = self._execution_device
        self._interrupt = False

        # 1. prompts: rows [positive x B; negative x B]
        pos = prompt_encoding if prompt_encoding is not None else self.encode_prompt(prompts, device)
        neg = negative_prompt_encoding if negative_prompt_encoding is not None else self.encode_prompt(negs, device)
        B = pos.embeds.shape[0]
        cond = self.prepare_conditioning([pos, neg])
        backbone = SwittiBackbone(self.transformer, self.vqvae, cond, batch=B)

        # 2. randomness
        if generator is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
            generator = torch.Generator(device=device).manual_seed(seed)
        seed0 = generator.initial_seed()

        # 3. scale loop
        f_hat = backbone.empty_fhat()
        with self.progress_bar(total=K) as bar:
            for si in range(K):
                if self.interrupt:
                    break
                if reseed_every_scale:
                    generator.manual_seed(seed0)
                ratio = si / (K - 1) if K > 1 else 1.0
                guided = turn_on_cfg_start_si <= si < off
                logits = backbone.scale_logits(si, f_hat, groups=2 if si < off else 1)
                if si < turn_on_cfg_start_si:
                    logits = logits[:B]
                elif guided:
                    t = guidance_scale * ratio
                    logits = (1 + t) * logits[:B] - t * logits[B:]
                elif last_scale_temp is not None:
                    logits = logits / last_scale_temp
                if more_smooth and si < off and si >= smooth_start_si:
                    probs = gumbel_softmax(logits.mul(1 + ratio), gumbel_tau(ratio), generator)
                    h = backbone.embed_probs(si, probs)
                else:
                    idx = sample_top_k_top_p(logits, top_k, top_p, generator)
                    h = backbone.embed_tokens(si, idx)
                f_hat = backbone.accumulate(si, f_hat, h)
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, si, None, {"f_hat": f_hat}) or {}
                    f_hat = out.get("f_hat", f_hat)
                bar.update()

        # 4. decode
        images = postprocess(backbone.decode(f_hat), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SwittiPipelineOutput(images=images)

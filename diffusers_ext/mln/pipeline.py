"""The MLN editing pipeline: image + source prompt + target prompt -> edited image and the mask used.

``MLNPipeline`` is a :class:`~diffusers_ext.switti.SwittiPipeline` (same components, same loading) whose
``__call__`` edits instead of generating. It is importable, and served to ``DiffusionPipeline.from_pretrained(...,
custom_pipeline=...)`` by the flat shim ``diffusers_ext/shims/mln/pipeline.py``.

Example::

    from diffusers_ext.mln import MLNPipeline
    from diffusers_ext.toy import world
    from diffusers_ext.weights import resolve
    pipe = MLNPipeline.from_pretrained(resolve("toy-switti").path)
    case = world.make_case("heldout", seed=0, index=0)
    out = pipe(world.to_pil(case.source), case.source_caption, case.target_caption, seed=42)
    out.images[0], out.masks[0]                      # PIL image, PIL mask (white = edited)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from ..errors import EditSteerConfigError
from ..switti.backbone import SwittiBackbone
from ..switti.pipeline import SwittiPipeline, postprocess
from .config import MLNConfig
from .core import mln_edit
from .masks import prepare_user_mask

logger = logging.getLogger(__name__)


@dataclass
class MLNPipelineOutput(BaseOutput):
    """``images`` and ``masks`` (white = edited; at the output size) in the requested type; ``info``: the preset,
    the mask's origin, warnings (truncated prompts, resizing), timings, transformer row-passes (``nfe``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    info: dict = field(default_factory=dict)


def image_to_tensor(image) -> torch.Tensor:
    """PIL / uint8 or [0, 1] float array (H, W, 3) / uint8 or [0, 1] tensor (3, H, W) or (1, 3, H, W) (e.g.
    ``torchvision.io.read_image``) -> (1, 3, H, W) in
    [-1, 1]. A float input with negative values is taken as already in [-1, 1], with a warning (as diffusers'
    ``VaeImageProcessor`` does); values above 1 are refused (a 0-255 float image would otherwise clip to white)."""
    if isinstance(image, PIL.Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        a = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise EditSteerConfigError(f"image array must be (H, W, 3), got {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu() / (255.0 if image.dtype == torch.uint8 else 1.0)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise EditSteerConfigError(f"image tensor must be (3, H, W) or (1, 3, H, W) in [0, 1] (or uint8), got "
                                       f"{tuple(image.shape)}")
    else:
        raise EditSteerConfigError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if not torch.isfinite(t).all():
        raise EditSteerConfigError("image has NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if hi > 1.0 + 1e-3:
        raise EditSteerConfigError(f"image values reach {hi:.3g}; pass floats in [0, 1] (or uint8 / PIL)")
    if lo < 0:
        logger.warning("MLN: image values go down to %.3g, so the image is taken as already in [-1, 1]; the expected "
                       "range for float input is [0, 1]", lo)
        return t.clamp(-1, 1)[None]
    return t.clamp(0, 1).mul(2).sub(1)[None]


#: The :class:`MLNConfig` fields ``MLNPipeline.__call__`` accepts as keyword overrides.
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(MLNConfig)) - {"name", "num_scales"}
#: Where diffusers' usual sampling arguments went.
_HINTS = {
    "guidance_scale": "MLN's guidance scale is the config field 'cfg' (source prompt as the negative)",
    "num_inference_steps": "Switti samples one pass per scale; the scales are fixed by the model",
    "negative_prompt": "MLN uses the source prompt as the negative",
    "height": "Switti works at its fixed size; other image sizes are resized there and back",
    "width": "Switti works at its fixed size; other image sizes are resized there and back",
}


def seed_of(seed: int | None, generator) -> int:
    """The sampler seed from ``seed`` or a diffusers-style ``generator`` (one, or a list of one). MLN reseeds the
    generator with its seed at every scale (official code), so a generator stands for its ``initial_seed()``."""
    if generator is None:
        return 42 if seed is None else int(seed)
    if seed is not None:
        raise EditSteerConfigError("pass seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise EditSteerConfigError(f"MLN edits one image per call; got {len(generator)} generators")
        generator = generator[0]
    if not isinstance(generator, torch.Generator):
        raise EditSteerConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(generator.initial_seed())


class MLNPipeline(SwittiPipeline):
    """Masked Logit Nudging (El-Ghoussani et al., CVPR 2026) on Switti: training-free prompt-to-prompt editing."""

    def resolve_config(self, preset: str | None, config: MLNConfig | None, global_edit: bool | None,
                       overrides: dict) -> MLNConfig:
        K = len(self.patch_nums)
        if config is None:
            config = MLNConfig.preset(preset) if preset is not None else MLNConfig.for_num_scales(K)
        if config.num_scales != K:
            raise EditSteerConfigError(
                f"MLN preset '{config.name}' is for a {config.num_scales}-scale Switti; this model has {K} scales "
                f"({self.resolution} px): use preset '{MLNConfig.for_num_scales(K).name}'" if K in (6, 10, 14)
                else f"MLN preset '{config.name}' needs {config.num_scales} scales; this model has {K}")
        unknown = sorted(set(overrides) - CONFIG_FIELDS)
        if unknown:
            hints = "".join(f"; {k!r}: {_HINTS[k]}" for k in unknown if k in _HINTS)
            raise EditSteerConfigError(
                f"MLNPipeline got unknown argument(s) {', '.join(map(repr, unknown))}. Besides its own arguments it "
                f"takes MLNConfig fields: {', '.join(sorted(CONFIG_FIELDS))}{hints}")
        if global_edit is not None:
            overrides = {**overrides, "global_edit": bool(global_edit)}
        return config.replace(**overrides) if overrides else config

    @torch.no_grad()
    def __call__(
        self,
        image,
        source_prompt: str,
        target_prompt: str,
        mask=None,
        preset: str | None = None,
        config: MLNConfig | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        global_edit: bool | None = None,
        mask_mode: str = "replace",
        resize: str = "resize",
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        source_encoding=None,
        target_encoding=None,
        **overrides,
    ) -> MLNPipelineOutput | tuple:
        r"""Edit ``image`` so that it matches ``target_prompt`` instead of ``source_prompt``.

        Args:
            image: PIL image, (H, W, 3) array (uint8 or [0, 1]) or (3, H, W) tensor in [0, 1]. Switti works at a
                fixed size (512 / 1024 px, 32 px for the toy); other sizes are resized there and the result is
                resized back (``info["warnings"]`` says so; resampling costs fidelity), or refused with
                ``resize="error"``.
            source_prompt: a caption of the input image. target_prompt: the caption of the wanted result.
            mask: optional edit region (white = edit): PIL / array / tensor at the image size, the model size or the
                token grid. ``mask_mode="replace"`` uses it instead of the automatic mask, ``"intersect"`` multiplies.
            preset: ``"512"``, ``"1024"`` (official code v2) or ``"toy"``; default: the one matching the model.
            config: a full :class:`MLNConfig` (instead of ``preset``); ``**overrides`` replace single fields, e.g.
                ``beta=8.0, refine_steps=0`` (an unknown name is refused, with the list of fields).
            seed: the sampler seed (reseeded at every scale; default 42). generator: instead of ``seed``, as in
                diffusers; it stands for its ``initial_seed()`` (the sampler reseeds at every scale).
            global_edit: mask everywhere and no refinement (style edits).
            callback_on_step_end: ``fn(pipe, scale_index, None, {"f_hat": f_hat})`` after every scale, for progress
                and previews; unlike :class:`SwittiPipeline`'s, its return value is ignored (the sampler owns
                ``f_hat``) and ``pipe._interrupt`` is not read: raise from it to stop an edit (ComfyUI's interrupt
                does).
            source_encoding, target_encoding: pre-computed prompt encodings (skip the text encoders).

        Returns:
            :class:`MLNPipelineOutput` with ``images``, ``masks`` and ``info``.

        Examples::

            pipe = MLNPipeline.from_switti_checkpoints("yresearch/Switti")
            out = pipe(photo, "a cat sitting on rocks", "a dog sitting on rocks", seed=42)
        """
        if not isinstance(source_prompt, str) or not isinstance(target_prompt, str):
            raise EditSteerConfigError("source_prompt and target_prompt must be strings (one edit per call)")
        if resize not in ("resize", "error"):
            raise EditSteerConfigError(f"resize must be 'resize' or 'error', got {resize!r}")
        cfg = self.resolve_config(preset, config, global_edit, overrides)
        seed = seed_of(seed, generator)
        device = self._execution_device
        R = self.resolution
        G = self.patch_nums[-1]
        info: dict = {"preset": cfg.name, "warnings": [], "config": cfg.to_json()}

        # 1. image (and its size)
        x = image_to_tensor(image)
        orig = tuple(x.shape[-2:])
        if orig != (R, R):
            if resize == "error":
                raise EditSteerConfigError(f"image is {orig[1]}x{orig[0]}, this Switti works at {R}x{R}; resize it, "
                                           "or pass resize='resize' to let the pipeline resize and restore it")
            note = (f"image resized from {orig[1]}x{orig[0]} to {R}x{R} for Switti and the result resized back; "
                    "resampling costs fidelity outside the edit")
            logger.warning("MLN: %s", note)
            info["warnings"].append(note)
            x = F.interpolate(x, size=(R, R), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        user_mask = prepare_user_mask(mask, G, sizes=[orig, (R, R)]) if mask is not None else None
        x = x.to(device=device, dtype=self.vqvae.dtype)

        # 2. prompts: rows [target; source]
        tgt = target_encoding if target_encoding is not None else self.encode_prompt([target_prompt], device)
        src = source_encoding if source_encoding is not None else self.encode_prompt([source_prompt], device)
        for which, enc in (("target", tgt), ("source", src)):
            info["warnings"] += [f"{which} {n}" for n in enc.truncated]
        backbone = SwittiBackbone(self.transformer, self.vqvae, self.prepare_conditioning([tgt, src]), batch=1)

        # 3. edit
        with self.progress_bar(total=len(self.patch_nums)) as bar:
            def on_scale(k, K, f_hat):
                if callback_on_step_end is not None:
                    callback_on_step_end(self, k, None, {"f_hat": f_hat})
                bar.update()

            result = mln_edit(backbone, x, cfg, seed=seed, source_ids=src.input_ids[0].tolist(),
                              source_len=int(src.attention_mask[0].sum()), target_ids=tgt.input_ids[0].tolist(),
                              target_len=int(tgt.attention_mask[0].sum()), user_mask=user_mask,
                              mask_mode=mask_mode, callback=on_scale)

        # 4. outputs at the input's size
        img = result.image
        M = F.interpolate(result.mask.float(), size=(R, R), mode="nearest")
        if orig != (R, R):
            img = F.interpolate(img, size=orig, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
            M = F.interpolate(M, size=orig, mode="nearest")
        for note in result.info.get("warnings", []):
            logger.warning("MLN: %s", note)
        info.update({k: v for k, v in result.info.items() if k not in ("config", "warnings")})
        info["warnings"] += result.info.get("warnings", [])
        info["nfe"] = result.nfe
        images = postprocess(img, output_type)
        masks = _mask_out(M, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, masks
        return MLNPipelineOutput(images=images, masks=masks, info=info)


def _mask_out(M: torch.Tensor, output_type: str):
    m = M.float().clamp(0, 1)[:, 0]
    if output_type == "pt":
        return m
    arr = m.cpu().numpy()
    if output_type == "np":
        return arr
    return [PIL.Image.fromarray((a * 255).round().astype(np.uint8), mode="L") for a in arr]

"""ComfyUI nodes of Masked Logit Nudging (Switti): thin V3 glue over ``diffusers_ext.mln``.

* ``EditSteerSwittiLoader``: the bundled toy Switti, or the official Switti 512 / 1024 from
  ``ComfyUI/models/editsteer/<id>/``, the Hugging Face cache, or (when allowed) the Hub, via the weight manifest.
* ``EditSteerMLNEdit``: IMAGE + source / target prompts (+ optional MASK) -> edited IMAGE + the MASK used, with
  per-scale progress, a preview of the partial image after every edited scale, and interrupt checks.
* ``EditSteerMLNToyCase``: a toy-world edit case (image, captions, ground-truth mask) for trying MLN on CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

logger = logging.getLogger("EditSteer")

SwittiModel = io.Custom("EDITSTEER_SWITTI")

MODELS = {
    "toy-switti (bundled, 32 px)": ("toy-switti", None),
    "switti-512 (yresearch/Switti)": ("switti-512", "yresearch/Switti"),
    "switti-1024 (yresearch/Switti-1024)": ("switti-1024", "yresearch/Switti-1024"),
}
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = ("auto", "512", "1024", "toy")
VARIANTS = ("paper", "fast")


def working_memory(pipe) -> int:
    """An upper estimate, in bytes, of what an MLN edit needs on the device beyond the weights: its largest pass
    (two prompt rows of the last scale's tokens) through one block (about 16 activations of the model width), the
    fp32 logits with their softmax and nudge copies, and one block's explicit cross-attention probabilities over the
    77 CLIP tokens (the mask pass records them). About 0.3 GB at 512 px and 1.1 GB at 1024 in bf16."""
    cfg = pipe.transformer.config
    tokens = 2 * pipe.patch_nums[-1] ** 2
    width = cfg.embed_dim * pipe.transformer.dtype.itemsize
    return tokens * (16 * width + 4 * cfg.V * 4 + cfg.num_heads * 77 * 4)


def load_switti(model: str, dtype: str = "auto", allow_download: bool = False):
    """A :class:`~comfy_nodes.managed.ManagedPipeline` of an :class:`~diffusers_ext.mln.MLNPipeline` for a loader
    choice (see ``MODELS``): loaded on ComfyUI's offload device (usually the CPU), moved to its device by
    :func:`run_mln`, and evicted by ComfyUI like its own models."""
    import comfy.model_management as mm

    from diffusers_ext.errors import EditSteerConfigError
    from diffusers_ext.mln import MLNPipeline
    from diffusers_ext.weights import resolve

    from .managed import ManagedPipeline

    if model not in MODELS:
        raise EditSteerConfigError(f"unknown Switti model {model!r}; choose one of {list(MODELS)}")
    artifact, repo = MODELS[model]
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    weight_dtype = DTYPES[dtype]
    if weight_dtype is None:
        weight_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if repo is None:  # a whole pipeline folder (the toy): fp32
        pipe = MLNPipeline.from_pretrained(resolve(artifact, allow_download=allow_download).path,
                                           use_safetensors=True)
    else:
        pipe = MLNPipeline.from_switti_checkpoints(artifact, "vqvae-switti", dtype=weight_dtype,
                                                   allow_download=allow_download)
    pipe.to(offload)
    pipe.set_progress_bar_config(disable=True)  # ComfyUI's own progress bar is used
    return ManagedPipeline(pipe, device, offload, working_memory(pipe))


class EditSteerSwittiLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerSwittiLoader",
            display_name="Switti Loader (MLN)",
            category="EditSteer/MLN",
            description="Loads a Switti text-to-image model (transformer, multi-scale VQ-VAE, CLIP-L + bigG) for "
                        "Masked Logit Nudging. Transformer and VQ-VAE: ComfyUI/models/editsteer/<id>/ first, then "
                        "the Hugging Face cache; the CLIP encoders: the Hugging Face cache. The Hub only when "
                        "'allow_download' is on.",
            inputs=[
                io.Combo.Input("model", options=list(MODELS), default=list(MODELS)[0],
                               tooltip="toy-switti runs on CPU in seconds (32 px toy scenes); switti-512 / -1024 are "
                                       "the official checkpoints (about 10 GB in fp32, a GPU recommended)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: fp32 on CPU, bf16 on GPU (official checkpoints only)."),
                io.Boolean.Input("allow_download", default=False,
                                 tooltip="Download missing official weights from the Hugging Face Hub."),
            ],
            outputs=[SwittiModel.Output(display_name="switti")],
        )

    @classmethod
    def execute(cls, model: str, dtype: str, allow_download: bool) -> io.NodeOutput:
        return io.NodeOutput(load_switti(model, dtype, allow_download))


def _preview(pipe, f_hat):
    """A quick look at the partial image: the features area-downsampled to a quarter of the grid's side, but at
    least 16 tokens a side, before decoding: a preview decodes 1/4 of the tokens at 512 px, 1/16 at 1024 px."""
    import torch.nn.functional as F
    from PIL import Image

    G = f_hat.shape[-1]
    side = G if G <= 16 else max(16, G // 4)
    with torch.no_grad():
        small = F.interpolate(f_hat.float(), size=(side, side), mode="area") if side != G else f_hat
        img = pipe.vqvae.fhat_to_img(small)[0].float().add(1).div(2).clamp(0, 1)
    arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    if pil.width < 256:  # toy images are tiny: show them larger
        pil = pil.resize((256, 256), Image.NEAREST)
    return ("JPEG", pil, 512)


def run_mln(switti, image: torch.Tensor, source_prompt: str, target_prompt: str, seed: int, preset: str = "auto",
            global_edit: bool = False, refine: bool = True, mask: torch.Tensor | None = None,
            mask_mode: str = "replace", preview: bool = True, progress=None, anchor: str = "preset",
            variant: str = "paper"):
    """Edit a ComfyUI IMAGE batch (B, H, W, 3) in [0, 1] with ``switti`` (from :func:`load_switti`; loaded onto
    ComfyUI's device once the inputs are checked); returns (IMAGE, MASK (B, H, W)). ``anchor``: "preset" keeps the
    preset's, "tokens" / "residual" override it (:attr:`MLNConfig.anchor`). ``variant``: "paper" runs the preset as
    it is, "fast" EditSteer's speed variant of it (:meth:`MLNConfig.fast`)."""
    import comfy.model_management as mm

    from diffusers_ext.errors import EditSteerConfigError

    if image.ndim != 4 or image.shape[-1] < 3:
        raise EditSteerConfigError(f"IMAGE must be (B, H, W, 3), got {tuple(image.shape)}")
    B = image.shape[0]
    pipe = switti.pipe
    if mask is not None:
        mask = mask if mask.ndim == 3 else mask[None]
        if mask.shape[0] not in (1, B):
            raise EditSteerConfigError(f"MASK batch {mask.shape[0]} does not match IMAGE batch {B} (use 1 or {B})")
    K = len(pipe.patch_nums)
    overrides = {} if refine else {"refine_steps": 0}
    if anchor != "preset":
        overrides["anchor"] = anchor
    if variant not in VARIANTS:
        raise EditSteerConfigError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = pipe.resolve_config(None if preset == "auto" else preset, None, global_edit, overrides)
    if variant == "fast":
        cfg = cfg.fast()
    switti.load()
    images, masks = [], []
    for b in range(B):
        def on_scale(_pipe, k, _t, kw, b=b):
            mm.throw_exception_if_processing_interrupted()
            if progress is not None:
                shown = _preview(pipe, kw["f_hat"]) if preview and k >= cfg.copy_scales else None
                progress.update_absolute(b * K + k + 1, B * K, shown)

        m = None if mask is None else mask[min(b, mask.shape[0] - 1)]
        out = pipe(image[b, ..., :3].permute(2, 0, 1), source_prompt, target_prompt, mask=m, config=cfg, seed=seed,
                   mask_mode=mask_mode, output_type="pt", callback_on_step_end=on_scale)
        for w in out.info.get("warnings", []):
            logger.warning("EditSteer MLN: %s", w)
        images.append(out.images[0].permute(1, 2, 0).cpu().float())
        masks.append(out.masks[0].cpu().float())
    return torch.stack(images), torch.stack(masks)


class EditSteerMLNEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerMLNEdit",
            display_name="MLN Edit (Switti)",
            category="EditSteer/MLN",
            description="Prompt-to-prompt editing with Masked Logit Nudging: describe the image (source prompt) and "
                        "the result (target prompt); everything outside the automatic edit mask is anchored to the "
                        "source. Presets 512 / "
                        "1024 are the official code v2's; 'toy' is EditSteer's for the toy model.",
            inputs=[
                SwittiModel.Input("switti", tooltip="A model from 'Switti Loader (MLN)'."),
                io.Image.Input("image", tooltip="The image to edit; resized to the model's size (512, 1024, or 32 "
                                                "for the toy) and back, with a warning in the log."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="A caption of the input image (what is there now)."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The caption of the wanted result; change only the words that should change."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Sampler seed, reseeded at every scale."),
                io.Combo.Input("preset", options=list(PRESETS), default="auto",
                               tooltip="auto picks the preset matching the model's scales."),
                io.Boolean.Input("global_edit", default=False,
                                 tooltip="Edit everywhere (style changes): mask everywhere, no refinement."),
                io.Boolean.Input("refine", default=True,
                                 tooltip="Quantisation refinement: restores the source's fine detail outside the "
                                         "mask."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional edit region (white = edit); replaces or narrows the automatic mask."),
                io.Combo.Input("mask_mode", options=["replace", "intersect"], default="replace",
                               tooltip="replace: use the given mask; intersect: automatic mask AND the given mask."),
                io.Boolean.Input("preview", default=True,
                                 tooltip="Show the partial image after every edited scale (a small VQ-VAE decode "
                                         "each)."),
                io.Combo.Input("anchor", options=["preset", "tokens", "residual"], default="preset", optional=True,
                               tooltip="What the nudge pulls toward. tokens: the source's fixed tokens (official; "
                                       "presets 512 / 1024). residual: the source re-tokenised over what was "
                                       "sampled so far (EditSteer's; preset toy), which rebuilds the unedited "
                                       "parts after an edit changed coarse scales."),
                io.Combo.Input("variant", options=list(VARIANTS), default="paper", optional=True,
                               tooltip="paper: the preset as it is. fast: EditSteer's speed variant (not the "
                                       "paper's method): the mask from the second-to-last scale and no adaptive "
                                       "weight at the last one; about 1.3x a plain generation at 512 / 1024 "
                                       "instead of 1.8x."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="edit_mask")],
        )

    @classmethod
    def execute(cls, switti, image, source_prompt, target_prompt, seed, preset, global_edit, refine, mask=None,
                mask_mode="replace", preview=True, anchor="preset", variant="paper") -> io.NodeOutput:
        import comfy.utils

        K = len(switti.pipe.patch_nums)
        bar = comfy.utils.ProgressBar(K * image.shape[0])
        out, masks = run_mln(switti, image, source_prompt, target_prompt, seed, preset, global_edit, refine, mask,
                             mask_mode, preview, bar, anchor, variant)
        return io.NodeOutput(out, masks)


class EditSteerMLNToyCase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerMLNToyCase",
            display_name="Toy Edit Case (MLN)",
            category="EditSteer/MLN",
            description="A toy-world scene (32 px) and an edit of it, as captions for MLN: image, source caption, "
                        "target caption and the exact edit mask. Focus captions name the edited object and the "
                        "background only, as a real edit prompt does (the MLN bench's default).",
            inputs=[
                io.Combo.Input("split", options=["heldout", "train"], default="heldout",
                               tooltip="held-out edits use colour/shape combinations no toy model edited in training."),
                io.Int.Input("index", default=0, min=0, max=99999, tooltip="Case number within the split."),
                io.Int.Input("case_seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the case generator."),
                io.Combo.Input("captions", options=["focus", "full"], default="focus",
                               tooltip="focus: the edited object and the background; full: every object, its size "
                                       "and cell (regeneration from it nearly reproduces the scene)."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.String.Output(display_name="source_caption"),
                     io.String.Output(display_name="target_caption"), io.Mask.Output(display_name="true_mask"),
                     io.Image.Output(display_name="target")],
        )

    @classmethod
    def execute(cls, split, index, case_seed, captions="focus") -> io.NodeOutput:
        from diffusers_ext.mln.captions import case_captions
        from diffusers_ext.toy import world

        case = world.make_case(split, case_seed, index)
        source, target = case_captions(case, captions)

        def img(a):
            return torch.from_numpy(a.astype(np.float32) / 255.0)[None]

        mask = torch.from_numpy(case.mask.astype(np.float32))[None]
        return io.NodeOutput(img(case.source), source, target, mask, img(case.target))


NODES = [EditSteerSwittiLoader, EditSteerMLNEdit, EditSteerMLNToyCase]

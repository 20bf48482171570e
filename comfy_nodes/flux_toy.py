"""The toy editor as ComfyUI objects: a MODEL run by ComfyUI's own ``comfy.ldm.flux.model.Flux``, a VAE, a text
encoder that produces Flux CONDITIONING.

ComfyUI's checkpoint detection hard-codes FLUX.1's widths, so the model config is built here from the diffusers
config (``diffusers_ext.toy.convert.flux_params``); the weights go through ComfyUI's own diffusers-to-ComfyUI Flux
key map (``comfy.model_detection.convert_diffusers_mmdit``) and the model is wrapped in a ``ModelPatcher``, so
ComfyUI's samplers, patches, wrappers and memory management run it as they run FLUX.1 Kontext.

Example (inside ComfyUI's Python)::

    from comfy_nodes.flux_toy import load_toy_for_comfy
    toy = load_toy_for_comfy("toy-kontext-editor")
    toy.model, toy.vae, toy.text_encoder.encode("make the red circle blue")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from diffusers_ext.errors import ModelFamilyError
from diffusers_ext.toy import convert

logger = logging.getLogger("EditSteer")


class ToyLatentFormat(comfy.latent_formats.LatentFormat):
    """Latent format of a diffusers ``AutoencoderKL`` with ``(z - shift) * scale`` (set per loaded editor)."""

    latent_channels = 4

    def __init__(self, scale_factor: float = 1.0, shift_factor: float = 0.0, latent_channels: int = 4,
                 rgb_factors=None, rgb_bias=None):
        self.scale_factor = scale_factor
        self.shift_factor = shift_factor
        self.latent_channels = latent_channels
        self.latent_rgb_factors = rgb_factors
        self.latent_rgb_factors_bias = rgb_bias

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


class ToyKontext(comfy.supported_models.Flux):
    """Model config of a FLUX.1-Kontext-class editor of any width (never auto-detected; built by the loader)."""

    unet_config = {"image_model": "flux"}
    sampling_settings = {"shift": 1.15}
    latent_format = ToyLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.Flux(self, model_type=comfy.model_base.ModelType.FLUX, device=device)


def comfy_flux_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The transformer's weights in ComfyUI's Flux layout (ComfyUI's own key map)."""
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    out = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if out is None:
        raise ModelFamilyError(f"{type(transformer).__name__} has no ComfyUI Flux key map (not a FLUX-class "
                               "transformer)")
    if sd:  # convert_diffusers_mmdit pops what it converted
        raise ModelFamilyError(f"these transformer weights have no place in ComfyUI's Flux: {sorted(sd)[:8]}")
    return out


def build_model_patcher(transformer, *, sampling_shift: float, latent_format: ToyLatentFormat,
                        dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL (``ModelPatcher`` over ``model_base.Flux``) with the weights of a diffusers
    ``FluxTransformer2DModel``. ``sampling_shift``: ``ModelSamplingFlux`` shift (diffusers' ``mu``)."""
    params = convert.flux_params(transformer.config)
    cfg = ToyKontext({"image_model": "flux", **params})
    cfg.latent_format = latent_format
    cfg.sampling_settings["shift"] = float(sampling_shift)
    sd = comfy_flux_state_dict(transformer)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    weight_dtype = next(iter(sd.values())).dtype
    if dtype is None:
        n = sum(v.numel() for v in sd.values())
        dtype = mm.unet_dtype(model_params=n, supported_dtypes=cfg.supported_inference_dtypes,
                              weight_dtype=weight_dtype)
    cfg.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, cfg.supported_inference_dtypes))
    model = cfg.get_model(sd, "", device=offload_device)
    expected = set(model.diffusion_model.state_dict())
    if set(sd) != expected:
        raise ModelFamilyError(f"the converted toy weights do not fit ComfyUI's Flux: missing "
                               f"{sorted(expected - set(sd))[:8]}, unexpected {sorted(set(sd) - expected)[:8]}")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_vae(autoencoder, *, scale_factor: int) -> comfy.sd.VAE:
    """A ComfyUI ``VAE`` (its batching, memory management and pixel conversions) around a diffusers
    ``AutoencoderKL``. ComfyUI's own AutoencoderKL hard-codes 32 GroupNorm groups, which tiny VAEs do not have, so
    the first-stage model is :class:`~diffusers_ext.toy.convert.AutoencoderKLAdapter`."""
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)}, dtype=torch.float32)  # ComfyUI's minimal first stage
    first_stage = convert.AutoencoderKLAdapter(autoencoder.float().eval()).eval()
    vae.first_stage_model = first_stage
    vae.downscale_ratio = vae.upscale_ratio = int(scale_factor)
    vae.latent_channels = int(autoencoder.config.latent_channels)
    vae.latent_dim = 2
    vae.output_channels = 3
    vae.working_dtypes = [torch.float32]
    vae.vae_dtype = torch.float32
    width = max(autoencoder.config.block_out_channels)
    vae.memory_used_encode = lambda shape, dtype: 64 * width * shape[2] * shape[3] * mm.dtype_size(dtype)
    vae.memory_used_decode = lambda shape, dtype: (64 * width * shape[2] * shape[3] * scale_factor ** 2
                                                   * mm.dtype_size(dtype))
    vae.patcher = comfy.model_patcher.ModelPatcher(first_stage, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    return vae


class ToyTextEncoder:
    """The toy editor's CLIP + T5 text encoders; ``encode`` runs the diffusers pipeline's own ``encode_prompt``, so
    ComfyUI gets exactly the embeddings diffusers computes. Small enough to stay on the CPU, outside model
    management."""

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T5 sequence (1, L, D), CLIP pooled (1, P))``."""
        seq, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=torch.device("cpu"),
                                                 max_sequence_length=self.max_sequence_length)
        return seq.float(), pooled.float()

    def encode(self, text: str) -> list:
        """ComfyUI CONDITIONING for Flux: ``[[T5 sequence, {"pooled_output": CLIP pooled}]]``."""
        seq, pooled = self.embed(text)
        return [[seq, {"pooled_output": pooled}]]


@dataclass
class ToyComfy:
    model: comfy.model_patcher.ModelPatcher
    vae: comfy.sd.VAE
    text_encoder: ToyTextEncoder
    settings: dict
    where: str


def load_toy_for_comfy(editor: str = "toy-kontext-editor", *, allow_download: bool = False,
                       dtype: torch.dtype | None = None) -> ToyComfy:
    """Load a toy editor (manifest id, resolved local-first, or a diffusers pipeline folder) as ComfyUI objects."""
    from diffusers_ext.toy import world
    from diffusers_ext.toy.editor import load_toy_editor, read_settings
    from diffusers_ext.weights import resolve

    p = Path(editor).expanduser()
    if p.is_dir():
        folder, where = p, f"folder {p}"
    else:
        found = resolve(editor, allow_download=allow_download)
        folder, where = Path(found.path), f"{found.source}: {found.path}"
    pipe, _ = load_toy_editor(folder)
    settings = read_settings(folder)
    vae_scale = convert.vae_scale_factor(pipe.vae.config)
    scale, shift = convert.latent_scaling(pipe.vae.config)
    scenes = [world.make_case("train", seed=0, index=i).source for i in range(16)]
    rgb, rgb_bias = convert.fit_latent_rgb(pipe.vae, scenes, scale, shift)
    fmt = ToyLatentFormat(scale, shift, int(pipe.vae.config.latent_channels), rgb, rgb_bias)
    mu = convert.flow_shift(pipe.scheduler.config, settings["height"], settings["width"], vae_scale)
    model = build_model_patcher(pipe.transformer, sampling_shift=mu, latent_format=fmt, dtype=dtype)
    vae = build_vae(pipe.vae, scale_factor=vae_scale)
    pipe.transformer = None  # the MODEL holds its own copy; the pipeline keeps only its text encoders
    pipe.vae = None
    logger.info("EditSteer: toy editor loaded from %s (ComfyUI Flux, %d+%d blocks, width %d)", where,
                len(model.model.diffusion_model.double_blocks), len(model.model.diffusion_model.single_blocks),
                model.model.diffusion_model.hidden_size)
    return ToyComfy(model, vae, ToyTextEncoder(pipe, settings["max_sequence_length"]), settings, where)

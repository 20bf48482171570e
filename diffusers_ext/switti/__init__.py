"""Switti (Yandex, CVPR 2025) ported to diffusers: scale-wise transformer, multi-scale residual VQ-VAE, CLIP-L +
bigG text conditioning, and a plain text-to-image pipeline. The official Hub checkpoints (``yresearch/Switti``,
``yresearch/Switti-1024``, ``yresearch/VQVAE-Switti``) load by their own parameter names.

Example::

    from diffusers_ext.switti import SwittiPipeline
    pipe = SwittiPipeline.from_switti_checkpoints("yresearch/Switti")     # local first; Hub only when allowed
    image = pipe("a cat on rocks near the ocean", seed=42).images[0]
"""

from .backbone import SwittiBackbone
from .loading import load_text_encoders, load_transformer, load_vqvae
from .pipeline import SwittiPipeline, SwittiPipelineOutput
from .schedules import RESOLUTION_PATCH_NUMS, TOY_PATCH_NUMS, patch_nums_for_resolution
from .transformer import SwittiConditioning, SwittiTransformer
from .vqvae import SwittiVQVAE

__all__ = [
    "RESOLUTION_PATCH_NUMS",
    "TOY_PATCH_NUMS",
    "SwittiBackbone",
    "SwittiConditioning",
    "SwittiPipeline",
    "SwittiPipelineOutput",
    "SwittiTransformer",
    "SwittiVQVAE",
    "load_text_encoders",
    "load_transformer",
    "load_vqvae",
    "patch_nums_for_resolution",
]

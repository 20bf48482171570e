"""What a second backend needs to run a diffusers FLUX.1-Kontext-class editor (the toy editor) as diffusers does.

ComfyUI's checkpoint detection hard-codes FLUX.1's widths, so a toy-sized editor cannot go through its
``UNETLoader``; the ComfyUI loader node builds the model itself from the numbers computed here. Everything in this
module is plain torch/diffusers and is shared by the ComfyUI adapter (``comfy_nodes/flux_toy.py``) and its tests:

- :func:`flux_params`: the ``comfy.ldm.flux.model.Flux`` constructor arguments (``FluxParams``) of a diffusers
  ``FluxTransformer2DModel`` config (diffusers packs 2x2 latent patches in the pipeline and uses ``patch_size=1``;
  ComfyUI packs inside the model: ``in_channels`` is the latent channel count and ``patch_size`` 2);
- :func:`flow_shift`: the ``mu`` the diffusers pipeline passes to its flow-matching scheduler for one image size
  (ComfyUI's ``ModelSamplingFlux`` takes it as ``shift``; with the ``simple`` scheduler the two give the same sigmas);
- :func:`latent_scaling`: the VAE's ``(scaling_factor, shift_factor)``, which ComfyUI applies in the model's latent
  format rather than in the VAE;
- :class:`AutoencoderKLAdapter`: a diffusers ``AutoencoderKL`` behind ComfyUI's first-stage-model interface
  (``encode`` returns the distribution's mode, unscaled, as the Kontext pipeline's ``argmax`` mode does);
- :func:`fit_latent_rgb`: a linear latent-to-RGB map for live previews, fitted on toy scenes;
- :func:`pack_latents` / :func:`unpack_latents`: diffusers' token layout <-> spatial latents.

Example::

    from diffusers_ext.toy.convert import flux_params, flow_shift
    from diffusers_ext.toy.editor import load_toy_editor
    pipe, _ = load_toy_editor()
    flux_params(pipe.transformer.config)["hidden_size"], flow_shift(pipe.scheduler.config, 32, 32, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import ModelFamilyError

#: ``FluxParams`` fields diffusers' ``FluxTransformer2DModel`` fixes in code rather than in its config.
FLUX_FIXED = {"mlp_ratio": 4.0, "theta": 10000, "qkv_bias": True}


def _get(cfg, key, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def flux_params(transformer_config) -> dict:
    """``comfy.ldm.flux.model.Flux(**params)`` arguments equal to a diffusers ``FluxTransformer2DModel`` config.

    Raises :class:`ModelFamilyError` for a config ComfyUI's Flux class cannot express (a ``patch_size`` other than
    1, packed channels not a multiple of 4, RoPE axes that do not add up to the head size).
    """
    patch = int(_get(transformer_config, "patch_size", 1))
    in_ch = int(_get(transformer_config, "in_channels"))
    out_ch = _get(transformer_config, "out_channels") or in_ch
    if patch != 1:
        raise ModelFamilyError(f"a FluxTransformer2DModel with patch_size={patch} has no ComfyUI Flux equivalent "
                               "(ComfyUI packs 2x2 latent patches itself; diffusers Flux configs use patch_size=1)")
    if in_ch % 4 or int(out_ch) % 4:
        raise ModelFamilyError(f"in_channels={in_ch} / out_channels={out_ch} are not 4 x latent channels: this is "
                               "not a FLUX-class transformer that packs 2x2 latent patches")
    heads = int(_get(transformer_config, "num_attention_heads"))
    head_dim = int(_get(transformer_config, "attention_head_dim"))
    axes = [int(a) for a in _get(transformer_config, "axes_dims_rope", (16, 56, 56))]
    if sum(axes) != head_dim:
        raise ModelFamilyError(f"RoPE axes {axes} do not add up to the head size {head_dim}")
    return {
        "in_channels": in_ch // 4,
        "out_channels": int(out_ch) // 4,
        "vec_in_dim": int(_get(transformer_config, "pooled_projection_dim")),
        "context_in_dim": int(_get(transformer_config, "joint_attention_dim")),
        "hidden_size": heads * head_dim,
        "num_heads": heads,
        "depth": int(_get(transformer_config, "num_layers")),
        "depth_single_blocks": int(_get(transformer_config, "num_single_layers")),
        "axes_dim": axes,
        "patch_size": 2,
        "guidance_embed": bool(_get(transformer_config, "guidance_embeds", False)),
        **FLUX_FIXED,
    }


def flow_shift(scheduler_config, height: int, width: int, vae_scale_factor: int) -> float:
    """The ``mu`` a diffusers Flux/Kontext pipeline uses for a ``height`` x ``width`` output (dynamic shifting), or
    the scheduler's static ``shift`` when dynamic shifting is off."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if not _get(scheduler_config, "use_dynamic_shifting", False):
        return float(_get(scheduler_config, "shift", 1.0))
    tokens = (int(height) // (vae_scale_factor * 2)) * (int(width) // (vae_scale_factor * 2))
    return float(calculate_shift(tokens, _get(scheduler_config, "base_image_seq_len", 256),
                                 _get(scheduler_config, "max_image_seq_len", 4096),
                                 _get(scheduler_config, "base_shift", 0.5), _get(scheduler_config, "max_shift", 1.15)))


def vae_scale_factor(vae_config) -> int:
    return 2 ** (len(_get(vae_config, "block_out_channels")) - 1)


def latent_scaling(vae_config) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)``: diffusers pipelines apply ``(z - shift) * scale`` after encoding."""
    return float(_get(vae_config, "scaling_factor", 1.0)), float(_get(vae_config, "shift_factor", None) or 0.0)


class AutoencoderKLAdapter(torch.nn.Module):
    """A diffusers ``AutoencoderKL`` with the first-stage interface ComfyUI's ``VAE`` object calls.

    ``encode(x)``: ``x`` in ``[-1, 1]``, ``(B, 3, H, W)`` -> the posterior's mode, unscaled (Kontext's "argmax").
    ``decode(z)``: unscaled latents -> images in ``[-1, 1]``. Scaling and shifting belong to the model's latent
    format on the ComfyUI side, exactly where diffusers pipelines apply them.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()

    def decode(self, z: torch.Tensor, **_ignored) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample


@torch.no_grad()
def fit_latent_rgb(vae, images: Sequence, scale: float, shift: float) -> tuple[list[list[float]], list[float]]:
    """Least-squares linear map from scaled latents ``(z - shift) * scale`` to RGB in ``[-1, 1]`` (downsampled to the
    latent grid): ``(factors [C][3], bias [3])``, the form of ComfyUI's ``latent_rgb_factors`` previews.

    ``images``: uint8 ``HxWx3`` arrays (e.g. toy scenes).
    """
    import numpy as np

    x = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1.0 for im in images])
    z = (AutoencoderKLAdapter(vae).encode(x).float() - shift) * scale  # (B, C, h, w)
    rgb = torch.nn.functional.adaptive_avg_pool2d(x, z.shape[-2:])  # (B, 3, h, w)
    a = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
    b = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(a.double(), b.double()).solution.float()  # (C + 1, 3)
    return sol[:-1].tolist(), sol[-1].tolist()


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Spatial latents ``(B, C, H, W)`` -> diffusers Flux tokens ``(B, H/2 * W/2, C * 4)`` (2x2 patches, channel
    major), the layout of ``FluxPipeline._pack_latents``."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    z = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, height, width)


__all__ = ["AutoencoderKLAdapter", "FLUX_FIXED", "fit_latent_rgb", "flow_shift", "flux_params", "latent_scaling",
           "pack_latents", "unpack_latents", "vae_scale_factor"]

"""MLN as one function over a VAR backbone: tokenise the source, mask, sample with nudged logits, refine, decode.

This is the method, free of pipeline plumbing (prompt encoding, image formats, progress bars): the diffusers
pipeline (:class:`diffusers_ext.mln.MLNPipeline`) and the ComfyUI node both call :func:`mln_edit`.

The backbone's prompt rows are ``[target; source]``: group 0 is the target prompt (the row that is nudged and
sampled), group 1 the source prompt (the CFG negative and the TV reference).

Example::

    from diffusers_ext.mln.core import mln_edit
    result = mln_edit(backbone, image, MLNConfig.preset("512"), seed=42,
                      source_ids=src.input_ids[0], source_len=int(src.attention_mask.sum()),
                      target_ids=tgt.input_ids[0], target_len=int(tgt.attention_mask.sum()))
    result.image, result.mask
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EditSteerConfigError
from .config import MLNConfig
from .masks import attention_difference, changed_token_pairs, quantile_mask
from .refine import refine_outside_mask
from .sampler import ClassifierFreeGuidance, MaskedLogitSampler, ScaleCallback, SourceNudge, SwittiTokenSampling, \
    Temperature

logger = logging.getLogger(__name__)


@dataclass
class MLNResult:
    """``image`` (1, 3, H, W) in [-1, 1]; ``mask`` (1, 1, G, G) in [0, 1] on the token grid (1 = edited);
    ``f_hat`` the final features; ``nfe`` transformer row-passes (mask passes included); ``info`` details."""

    image: torch.Tensor
    mask: torch.Tensor
    f_hat: torch.Tensor
    nfe: int
    info: dict = field(default_factory=dict)


def build_sampler(config: MLNConfig) -> MaskedLogitSampler:
    """MLN's processors: masked TV-adaptive nudge, CFG with the source prompt as negative, last-scale temperature."""
    return MaskedLogitSampler(
        processors=[SourceNudge(config.beta, config.alphas, config.gamma, config.tv_adaptive, config.tv_stop),
                    ClassifierFreeGuidance(config.cfg, config.cfg_start, config.cfg_stop),
                    Temperature(config.last_temp, start=config.cfg_stop)],
        token_sampling=SwittiTokenSampling(config.smooth_start, config.cfg_stop, config.top_k, config.top_p,
                                           config.more_smooth))


@torch.no_grad()
def compute_edit_mask(backbone, source_tokens: list[torch.Tensor], config: MLNConfig, *, source_ids, source_len,
                      target_ids, target_len) -> tuple[torch.Tensor, dict]:
    """The automatic mask (1, 1, G, G) from cross-attention differences at the mask scale (see :mod:`.masks`)."""
    if source_ids is None or target_ids is None:
        raise EditSteerConfigError("the automatic mask compares the prompts' tokens: pass source_ids and target_ids "
                                   "(with source_len, target_len), or a user mask (mask_mode='replace'), or "
                                   "global_edit=True")
    K = len(backbone.patch_nums)
    m = config.mask_scale if config.mask_scale is not None else K - 1
    pairs = changed_token_pairs(source_ids, target_ids, source_len, target_len, config.mask_neighbours)
    G = backbone.patch_nums[-1]
    info = {"mask_scale": m, "token_pairs": pairs}
    if not pairs:
        logger.warning("MLN: the source and target prompts tokenise identically; the automatic mask is empty")
        info["mask_source"] = "empty (identical prompts)"
        return torch.zeros(1, 1, G, G, device=source_tokens[0].device), info
    blocks = config.blocks_for_depth(backbone.num_blocks)
    prefix = backbone.prefix_fhat(source_tokens, m)
    maps = backbone.cross_attention_maps(m, prefix, groups=2, blocks=blocks)  # (2, l, T): [target; source]
    d = attention_difference(maps[1], maps[0], pairs)
    pn = backbone.patch_nums[m]
    M = quantile_mask(d, config.mask_quantile).view(1, 1, pn, pn)
    if pn != G:
        M = F.interpolate(M, size=(G, G), mode="bilinear", align_corners=False)
    info.update(mask_source="auto", mask_blocks=[blocks.start, blocks.stop], attention_difference=d.view(pn, pn))
    return M, info


def anchored_weight(tv_weights: dict[int, torch.Tensor], patch_nums) -> torch.Tensor | float:
    """How anchored each final-grid position stayed: the TV weight (B, l) of the finest scale that has one,
    bilinearly resized to (B, 1, G, G); 1 (refine everywhere outside the mask) if no scale had a TV weight."""
    if not tv_weights:
        return 1.0
    k = max(tv_weights)
    pn, G = patch_nums[k], patch_nums[-1]
    w = tv_weights[k].float().view(-1, 1, pn, pn)
    return w if pn == G else F.interpolate(w, size=(G, G), mode="bilinear", align_corners=False)


@torch.no_grad()
def mln_edit(backbone, image: torch.Tensor, config: MLNConfig, *, seed: int = 42, source_ids=None,
             source_len: int | None = None, target_ids=None, target_len: int | None = None,
             user_mask: torch.Tensor | None = None, mask_mode: str = "replace",
             callback: ScaleCallback | None = None) -> MLNResult:
    """Edit one image (1, 3, R, R) in [-1, 1] with MLN (``methods.md`` 4.4). See the module docstring."""
    K = len(backbone.patch_nums)
    if config.num_scales != K:
        raise EditSteerConfigError(f"MLN config '{config.name}' is for {config.num_scales} scales; the model has {K}")
    if image.ndim != 4 or image.shape[0] != 1:
        raise EditSteerConfigError(f"mln_edit takes one image (1, 3, H, W), got {tuple(image.shape)}")
    if mask_mode not in ("replace", "intersect"):
        raise EditSteerConfigError(f"mask_mode must be 'replace' or 'intersect', got {mask_mode!r}")
    t0 = time.perf_counter()
    info: dict = {"config": config.name}
    nfe0 = backbone.nfe
    # 1. tokenise the source
    source_tokens, f = backbone.tokenize(image)
    G = backbone.patch_nums[-1]
    # 2. the edit mask
    mask_matters = any(a != config.beta for a in config.alphas[config.copy_scales:]) or config.refine_steps > 0
    warnings = info["warnings"] = []
    if config.global_edit:
        M = torch.ones(1, 1, G, G, device=f.device)
        info["mask_source"] = "global"
        if user_mask is not None:
            warnings.append("global_edit edits everywhere: the mask input is ignored")
    elif not mask_matters:  # equal strength inside and outside, no refinement: the mask changes nothing
        unused = "equal nudge inside and outside, no refinement"
        if user_mask is None:
            M = torch.zeros(1, 1, G, G, device=f.device)
            info["mask_source"] = f"unused ({unused})"
        else:  # returned as given, so a caller sees the mask it drew, with a warning that it had no effect
            M = user_mask.to(f.device).float()
            info["mask_source"] = f"user, no effect ({unused})"
            warnings.append(f"the mask input has no effect with this configuration ({unused})")
    elif user_mask is not None and mask_mode == "replace":
        M = user_mask.to(f.device).float()
        info["mask_source"] = "user"
    else:
        M, minfo = compute_edit_mask(backbone, source_tokens, config, source_ids=source_ids, source_len=source_len,
                                     target_ids=target_ids, target_len=target_len)
        info.update(minfo)
        if user_mask is not None:
            M = M * user_mask.to(f.device).float()
            info["mask_source"] = "auto x user"
    info["mask_s"] = time.perf_counter() - t0
    # 3. the scale loop
    t1 = time.perf_counter()
    out = build_sampler(config).run(backbone, seed=seed, reseed_every_scale=config.reseed_every_scale,
                                    source_tokens=source_tokens, copy_scales=config.copy_scales, mask=M,
                                    source_features=f if config.anchor == "residual" else None,
                                    callback=callback)
    info["sample_s"] = time.perf_counter() - t1
    # 4. quantisation refinement outside the mask
    f_hat = out.f_hat
    if config.refine_steps and not config.global_edit:
        keep = 1 - M
        if config.refine_keep == "mask_tv":
            tv = out.extras.get("tv_weight", {})
            keep = keep * anchored_weight(tv, backbone.patch_nums)
            info["refine_tv_scale"] = max(tv) if tv else None
        f_hat = refine_outside_mask(f, f_hat, backbone.codebook, keep, config.refine_steps, config.refine_tau,
                                    config.refine_tol)
    # 5. decode
    img = backbone.decode(f_hat)
    info["total_s"] = time.perf_counter() - t0
    return MLNResult(image=img, mask=M, f_hat=f_hat, nfe=backbone.nfe - nfe0, info=info)

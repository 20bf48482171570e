"""The training objectives of AnchorEdit's three stages, in plain torch (``methods.md`` sections 2.5-2.7).

Flow matching throughout: ``x_t = (1 - s) x0 + s eps``, ``s = t / 1000``, the model predicts ``v = eps - x0``.
Every random draw takes an explicit ``torch.Generator`` so that a training step is a pure function of its seed
(resumed runs repeat exactly).

* :func:`sample_frame_timesteps` - stage 2's per-frame timesteps (monotonic upper bound, independent, unsorted).
* :func:`degrade_history` - stage 2's latent degradation of every frame before noising.
* :func:`self_rollout_replace` - stage 2's scheduled sampling: replace intermediate frames by the model's x̂₀.
* :func:`turn_weighted_mse` - stage 2's turn-weighted flow loss.
* :func:`cd_grid` / :func:`dmd_generator_target` - stage 3's consistency grid and DMD gradient.

Example::

    import torch
    from diffusers_ext.anchoredit.objectives import FrameTimestepConfig, sample_frame_timesteps
    g = torch.Generator().manual_seed(0)
    t = sample_frame_timesteps(4, 6, g, FrameTimestepConfig())      # [4, 6] integers in [20, 979]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EditSteerConfigError


def _rand(shape, g: torch.Generator, device=None) -> torch.Tensor:
    return torch.rand(shape, generator=g).to(device) if device is not None else torch.rand(shape, generator=g)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - s) x0 + s noise`` with ``s = t / 1000`` broadcast over ``[B, C, F, H, W]`` (``t``: [B] or [B, F])."""
    s = t.to(x0.device, torch.float32) / 1000.0
    s = s.view(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.view(-1, 1, 1, 1, 1)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t - s v``: the clean latent implied by a flow prediction."""
    s = t.to(x_t.device, torch.float32) / 1000.0
    s = s.view(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.view(-1, 1, 1, 1, 1)
    return (x_t.float() - s * v.float()).to(x_t.dtype)


# --------------------------------------------------------------------------------------------------------------
# stage 2: timesteps


@dataclass(frozen=True)
class FrameTimestepConfig:
    """Per-frame timestep sampler of the official stage-2 trainer (defaults: its YAML; ``monotonic`` per the
    causal recipe)."""

    u_last_min: float = 0.7  # u_last_max_min_ratio
    first_min: float = 0.35  # first_frame_noise_min_ratio
    first_max: float = 0.55  # first_frame_noise_max_ratio
    monotonic: bool = True
    shift: float = 1.0  # timestep_shift applied to u_last
    min_step_ratio: float = 0.02
    max_step_ratio: float = 0.98
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not 0 <= self.first_min <= self.first_max <= 1:
            raise EditSteerConfigError("FrameTimestepConfig: need 0 <= first_min <= first_max <= 1")
        if not 0 <= self.u_last_min <= 1:
            raise EditSteerConfigError("FrameTimestepConfig: u_last_min must be in [0, 1]")


def sample_frame_timesteps(batch: int, frames: int, g: torch.Generator,
                           cfg: FrameTimestepConfig = FrameTimestepConfig()) -> torch.Tensor:
    """``[batch, frames]`` integer timesteps (as float) for a noised sequence, frame 0 included.

    u_last ~ U[u_last_min, 1] (shifted); u_low ~ U[first_min, first_max], clipped to u_last;
    base = min(max(u_low + 1e-4, first_max), u_last); upper_i = base + (u_last - base) p_i with p_i = i / (T - 1)
    (monotonic) or 1; u_i ~ U[u_low, upper_i] independently; t_i = min_step + u_i (max_step - min_step), integer.
    """
    u_last = cfg.u_last_min + (1 - cfg.u_last_min) * _rand((batch,), g)
    if cfg.shift != 1.0:
        u_last = cfg.shift * u_last / (1 + (cfg.shift - 1) * u_last)
    u_low = cfg.first_min + (cfg.first_max - cfg.first_min) * _rand((batch,), g)
    u_low = torch.minimum(u_low, u_last)
    if cfg.monotonic and frames > 1:
        pos = torch.linspace(0.0, 1.0, frames)
    else:
        pos = torch.ones(frames)
    base = torch.minimum(torch.maximum(u_low + 1e-4, torch.full_like(u_low, cfg.first_max)), u_last)
    upper = base[:, None] + (u_last - base)[:, None] * pos[None]
    u = (u_low[:, None] + (upper - u_low[:, None]) * _rand((batch, frames), g)).clamp(0, 1)
    n = cfg.num_train_timesteps
    lo, hi = int(cfg.min_step_ratio * n), int(cfg.max_step_ratio * n)
    return (lo + u * (hi - lo)).long().clamp(lo, hi - 1).float()


# --------------------------------------------------------------------------------------------------------------
# stage 2: history degradation


@dataclass(frozen=True)
class DegradationConfig:
    """Latent degradation of ``_degrade_history_latents`` with the probabilities/strengths of the stage-2 YAML."""

    enable: bool = True
    monotonic: bool = True
    lower_frac: float = 0.15
    p_vae_rt: float = 0.1
    vae_rt_mix: float = 0.4
    p_color: float = 0.2
    color_scale: float = 0.05
    color_bias: float = 0.03
    p_lowfreq: float = 0.2
    lowfreq_amp: float = 0.06
    p_block: float = 0.1
    block_sizes: tuple[int, ...] = (2, 4)
    p_laplace: float = 0.1
    laplace_b: float = 0.035
    p_blur: float = 0.1
    blur_sigma_max: float = 0.45


def degrade_history(latents: torch.Tensor, g: torch.Generator, cfg: DegradationConfig = DegradationConfig(),
                    vae_roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Degrade every frame of ``latents`` ``[B, T, C, H, W]`` (strength grows with the frame index when
    ``monotonic``); ``vae_roundtrip`` maps ``[N, C, H, W]`` latents through decode -> encode (never frame 0)."""
    if not cfg.enable:
        return latents
    b, t, c, h, w = latents.shape
    if t <= 1:
        return latents
    dev, dt = latents.device, latents.dtype
    pos = torch.linspace(0.0, 1.0, t) if cfg.monotonic else torch.ones(t)
    lo = cfg.lower_frac
    upper = (lo + (1 - lo) * pos).view(1, t, 1, 1, 1)
    s = (lo + (upper - lo) * _rand((b, t, 1, 1, 1), g)).to(dev, dt)  # per (b, t) strength
    out = latents.clone()

    def fire(p):
        return (_rand((b, t, 1, 1, 1), g) < p).to(dev, dt)

    if cfg.p_vae_rt > 0 and vae_roundtrip is not None:
        sel = _rand((b, t), g) < cfg.p_vae_rt
        sel[:, 0] = False
        idx = sel.nonzero(as_tuple=False)
        if len(idx):
            bi, ti = idx[:, 0].to(dev), idx[:, 1].to(dev)
            with torch.no_grad():
                rt = vae_roundtrip(out[bi, ti]).to(dev, dt)
            mix = (cfg.vae_rt_mix * s[bi, ti, 0, 0, 0]).view(-1, 1, 1, 1)
            out[bi, ti] = out[bi, ti] * (1 - mix) + rt * mix
    m = fire(cfg.p_color)
    scale = 1 + (_rand((b, t, c, 1, 1), g).to(dev, dt) * 2 - 1) * cfg.color_scale * s
    bias = (_rand((b, t, c, 1, 1), g).to(dev, dt) * 2 - 1) * cfg.color_bias * s
    out = out * (1 - m) + (out * scale + bias) * m
    m = fire(cfg.p_lowfreq)
    low = _rand((b * t, c, max(2, h // 16), max(2, w // 16)), g).to(dev, dt) * 2 - 1
    low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).view(b, t, c, h, w)
    amp = _rand((b, t, 1, 1, 1), g).to(dev, dt) * cfg.lowfreq_amp * s
    out = out + m * amp * low
    m = fire(cfg.p_block)
    bs = int(cfg.block_sizes[int(_rand((1,), g).item() * len(cfg.block_sizes)) % len(cfg.block_sizes)])
    if h % bs == 0 and w % bs == 0:
        flat = out.reshape(b * t, c, h, w)
        up = F.interpolate(F.avg_pool2d(flat, bs, bs), size=(h, w), mode="nearest").view(b, t, c, h, w)
        mix = m * 0.5 * s
        out = out * (1 - mix) + up * mix
    m = fire(cfg.p_laplace)
    u = _rand((b, t, c, h, w), g).to(dev) - 0.5
    lap = (-torch.sign(u) * torch.log1p(-2.0 * u.abs() + 1e-7)).to(dt)
    out = out * (1 + m * cfg.laplace_b * s * lap)
    m = fire(cfg.p_blur)
    sigma = 0.1 + (cfg.blur_sigma_max - 0.1) * float(_rand((1,), g))
    ax = torch.arange(-1, 2, dtype=torch.float32)
    xx, yy = torch.meshgrid(ax, ax, indexing="ij")
    k = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(dev, dt).view(1, 1, 3, 3).expand(c, 1, 3, 3).contiguous()
    blurred = F.conv2d(out.reshape(b * t, c, h, w), k, padding=1, groups=c).view(b, t, c, h, w)
    out = out * (1 - m * s) + blurred * (m * s)
    return out


# --------------------------------------------------------------------------------------------------------------
# stage 2: self-rollout and the loss


def self_rollout_replace(latents: torch.Tensor, x0_pred: torch.Tensor, prob: float, g: torch.Generator):
    """Replace each intermediate frame (1..T-2) of ``latents`` ``[B, T, ...]`` by ``x0_pred`` with probability
    ``prob``. Returns (new latents, replaced mask ``[B, T]``); the source and the last frame are never replaced."""
    b, t = latents.shape[:2]
    mask = torch.zeros(b, t, dtype=torch.bool)
    if prob > 0 and t > 2:
        mask[:, 1:t - 1] = _rand((b, t - 2), g) < prob
    m = mask.to(latents.device).view(b, t, *([1] * (latents.ndim - 2))).to(latents.dtype)
    return latents * (1 - m) + x0_pred.detach().to(latents.dtype) * m, mask


def turn_weights(batch: int, frames: int, alpha: float, replaced: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T-1]`` weights of frames 1..T-1: ``(1 + alpha q_i)``, ``q_i = (i-1)/(T-2)``, 0 where replaced."""
    n = frames - 1
    q = torch.linspace(0.0, 1.0, n) if n > 1 else torch.zeros(max(n, 1))
    w = (1.0 + alpha * q[:n]).view(1, n).expand(batch, n).clone()
    if replaced is not None:
        w = w * (~replaced[:, 1:]).float()
    return w


def turn_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum_i w_i MSE_i / sum_i w_i`` over frames 1..T-1 of ``[B, C, T, H, W]`` tensors, averaged over
    samples that keep at least one weighted frame."""
    mse = (pred[:, :, 1:].float() - target[:, :, 1:].float()).square().mean(dim=(1, 3, 4))  # [B, T-1]
    w = weights.to(mse.device)
    wsum = w.sum(1)
    per = (mse * w).sum(1) / wsum.clamp_min(1e-6)
    valid = (wsum > 0).float()
    return (per * valid).sum() / valid.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------------------------
# stage 3


def cd_grid(n: int = 48, shift: float = 5.0) -> torch.Tensor:
    """The ``n`` timesteps of the consistency grid (``linspace(1, 0, n+1)[:-1]`` shifted), descending, in 0..1000."""
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return (s * 1000).float()


def dmd_generator_target(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD regression target ``x0_gen - grad`` with ``grad = (fake - real) / mean|x0_gen - real|`` per sample."""
    grad = x0_fake.double() - x0_real.double()
    norm = (x0_gen.double() - x0_real.double()).abs().mean(dim=tuple(range(1, x0_gen.ndim)), keepdim=True)
    grad = torch.nan_to_num(grad / norm.clamp_min(1e-6))
    return (x0_gen.double() - grad).detach()


__all__ = ["DegradationConfig", "FrameTimestepConfig", "add_noise", "cd_grid", "degrade_history",
           "dmd_generator_target", "sample_frame_timesteps", "self_rollout_replace", "turn_weighted_mse",
           "turn_weights", "x0_from_v"]

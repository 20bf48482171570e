"""Per-turn samplers of AnchorEdit, in plain torch (flow matching, ``x_t = (1 - s) x0 + s eps``, ``v = eps - x0``,
timestep = 1000 s, as Wan and the official code).

* :func:`sample_distilled` - the 4-step schedule of the distilled model: at each timestep predict x̂₀, re-noise it
  with fresh noise to the next timestep; the last x̂₀ is the result (``pipeline/multi_turn_inference.py``).
* :func:`sample_flow` - a many-step Euler sampler over shifted sigmas for undistilled (stage-1/2) weights.

``predict(x, t) -> v`` is the model (the session adds CFG and the KV cache); ``generator`` is a CPU generator
seeded per turn (``seed + 7919 * turn``) so that a turn reproduces on any device.

Example::

    import torch
    from diffusers_ext.anchoredit import SamplerConfig
    from diffusers_ext.anchoredit.sampling import sample_turn
    target = torch.zeros(1, 4, 1, 8, 8)
    predict = lambda x, t: (x - target) / (t / 1000)      # an oracle: v = eps - x0
    x0 = sample_turn(predict, target.shape, SamplerConfig.distilled(), torch.Generator().manual_seed(7919))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import SamplerConfig

Predict = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]  # (step index, total steps, current x̂₀ estimate)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0: ``shift s / (1 + (shift - 1) s)`` over ``linspace(1, 0)`` (Wan/SD3 shift)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def _noise(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def sample_distilled(predict: Predict, shape, timesteps, generator=None, *, device="cpu", dtype=torch.float32,
                     num_train_timesteps: int = 1000, callback: StepCallback | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """Few-step sampling with re-noising between steps; returns x̂₀ of the last step."""
    x = _noise(shape, generator, device, dtype) if noise is None else noise.to(device=device, dtype=dtype)
    x0 = x
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        s = float(t) / num_train_timesteps
        v = predict(x, float(t))
        x0 = (x.float() - s * v.float()).to(dtype)
        if callback is not None:
            callback(i, n, x0)
        if i + 1 < n:
            s_next = float(timesteps[i + 1]) / num_train_timesteps
            x = ((1 - s_next) * x0.float() + s_next * _noise(shape, generator, device, torch.float32)).to(dtype)
    return x0


def sample_flow(predict: Predict, shape, steps: int, shift: float, generator=None, *, device="cpu",
                dtype=torch.float32, num_train_timesteps: int = 1000, callback: StepCallback | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Euler flow-matching sampling from pure noise over ``steps`` shifted sigmas; returns the final latent."""
    sig = shifted_sigmas(steps, shift)
    x = (_noise(shape, generator, device, torch.float32) if noise is None else noise.to(device, torch.float32))
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        v = predict(x.to(dtype), s * num_train_timesteps).float()
        if callback is not None:
            callback(i, steps, (x - s * v).to(dtype))
        x = x + (s_next - s) * v
    return x.to(dtype)


def sample_turn(predict: Predict, shape, sampler: SamplerConfig, generator=None, *, device="cpu",
                dtype=torch.float32, callback: StepCallback | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one turn's clean latent with the schedule of ``sampler``."""
    if sampler.kind == "distilled":
        return sample_distilled(predict, shape, sampler.timesteps, generator, device=device, dtype=dtype,
                                num_train_timesteps=sampler.num_train_timesteps, callback=callback, noise=noise)
    return sample_flow(predict, shape, sampler.steps, sampler.shift, generator, device=device, dtype=dtype,
                       num_train_timesteps=sampler.num_train_timesteps, callback=callback, noise=noise)


def turn_generator(sampler: SamplerConfig, seed: int, turn: int) -> torch.Generator:
    """The CPU generator of turn ``turn`` (1-based) of a session seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(sampler.turn_seed(seed, turn))


__all__ = ["sample_distilled", "sample_flow", "sample_turn", "shifted_sigmas", "turn_generator"]

"""Edit pairs as flow-matching training batches for a FLUX.1 Kontext pipeline (the toy editor by default).

Each case is encoded once with the pipeline's own components (VAE latents packed as the pipeline packs them, T5/CLIP
prompt embeddings, RoPE ids), so a training or probe forward sees exactly what the pipeline would feed its
transformer. Timesteps are drawn from the pipeline's own inference schedule (same ``mu`` shift), so the critic is
trained at the noise levels it will meet.

Example::

    data = KontextEditData.from_toy_world(pipe, n_cases=64, split="train", seed=0)
    batch = data.batch(torch.arange(8))
    x_t, v_star, sigma = data.noised(batch, torch.Generator().manual_seed(0))
    v_hat = data.forward(pipe.transformer, batch, x_t, sigma)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..toy import world as W


@dataclass
class KontextEditData:
    """Encoded edit pairs: target latents ``x0``, condition latents, prompt embeddings, ids, sigma schedule."""

    x0: torch.Tensor  # (N, T, C) packed target latents
    cond: torch.Tensor  # (N, T_c, C) packed source-image latents
    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor  # (N, P)
    text_ids: torch.Tensor  # (L, 3)
    img_ids: torch.Tensor  # (T + T_c, 3)
    sigmas: torch.Tensor  # (steps,) the inference schedule
    guidance: float | None
    grid: tuple[int, int]
    instructions: list[str]
    families: list[str]
    edit_tokens: torch.Tensor | None = None  # (N, T) bool: target tokens that overlap the edit mask

    def __len__(self) -> int:
        return self.x0.shape[0]

    @classmethod
    @torch.no_grad()
    def from_cases(cls, pipe, sources, targets, instructions, families=None, masks=None, *,
                   settings: dict | None = None, chunk: int = 64) -> "KontextEditData":
        from ..toy.editor import toy_pipeline_kwargs

        kw = toy_pipeline_kwargs(pipe, **(settings or {}))
        h, w = kw["height"], kw["width"]
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        n_ch = pipe.transformer.config.in_channels // 4
        xs, cs, pes, pps = [], [], [], []
        text_ids = img_ids = None
        for i in range(0, len(instructions), chunk):
            src = pipe.image_processor.preprocess([W.to_pil(np.asarray(s)) for s in sources[i:i + chunk]], h, w)
            tgt = pipe.image_processor.preprocess([W.to_pil(np.asarray(t)) for t in targets[i:i + chunk]], h, w)
            b = src.shape[0]
            both = pipe._encode_vae_image(torch.cat([src, tgt]).to(device, dtype), generator=None)
            lh, lw = both.shape[2:]
            packed = pipe._pack_latents(both, 2 * b, n_ch, lh, lw)
            cs.append(packed[:b])
            xs.append(packed[b:])
            pe, pooled, text_ids = pipe.encode_prompt(prompt=list(instructions[i:i + chunk]), prompt_2=None,
                                                      device=device, max_sequence_length=kw["max_sequence_length"])
            pes.append(pe)
            pps.append(pooled)
            lat_ids = pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, device, dtype)
            cond_ids = lat_ids.clone()
            cond_ids[..., 0] = 1
            img_ids = torch.cat([lat_ids, cond_ids])
            grid = (lh // 2, lw // 2)
        guidance = kw["guidance_scale"] if pipe.transformer.config.guidance_embeds else None
        edit_tokens = None if masks is None else token_masks(masks, grid)
        return cls(torch.cat(xs), torch.cat(cs), torch.cat(pes), torch.cat(pps), text_ids, img_ids,
                   inference_sigmas(pipe, xs[0].shape[1], kw["num_inference_steps"]), guidance, grid,
                   list(instructions), list(families or [""] * len(instructions)), edit_tokens)

    @classmethod
    def from_toy_world(cls, pipe, n_cases: int, split: str = "train", seed: int = 0,
                       families: tuple[str, ...] = W.FAMILIES, **kw) -> "KontextEditData":
        cases = [W.make_case(split, seed, i, families) for i in range(n_cases)]
        return cls.from_cases(pipe, [c.source for c in cases], [c.target for c in cases],
                              [c.instruction for c in cases], [c.family for c in cases], [c.mask for c in cases], **kw)

    def batch(self, idx: torch.Tensor) -> dict:
        b = {"x0": self.x0[idx], "cond": self.cond[idx], "prompt_embeds": self.prompt_embeds[idx],
             "pooled": self.pooled[idx]}
        if self.edit_tokens is not None:
            b["edit_tokens"] = self.edit_tokens[idx]
        return b

    def noised(self, batch: dict, generator: torch.Generator, sigma_index: torch.Tensor | None = None):
        """``x_t = (1 - s) x0 + s noise``, ``v* = noise - x0``, with ``s`` drawn from the inference schedule."""
        x0 = batch["x0"]
        b = x0.shape[0]
        if sigma_index is None:
            sigma_index = torch.randint(len(self.sigmas), (b,), generator=generator)
        sigma = self.sigmas[sigma_index].to(x0.device, x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        s = sigma[:, None, None]
        return (1 - s) * x0 + s * noise, noise - x0, sigma

    def forward(self, transformer, batch: dict, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity for the target tokens, called exactly as ``FluxKontextPipeline`` calls it."""
        b, n = x_t.shape[:2]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x_t.device, dtype=x_t.dtype)
        out = transformer(hidden_states=torch.cat([x_t, batch["cond"]], dim=1), timestep=sigma, guidance=guidance,
                          pooled_projections=batch["pooled"], encoder_hidden_states=batch["prompt_embeds"],
                          txt_ids=self.text_ids, img_ids=self.img_ids, return_dict=False)[0]
        return out[:, :n]


def token_masks(masks, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel edit masks (N, H, W) -> (N, h*w) bool over the packed target tokens (a token is "edit" if any of its
    pixels is)."""
    import torch.nn.functional as F

    m = torch.as_tensor(np.stack([np.asarray(x) for x in masks]), dtype=torch.float32)[:, None]
    h, w = grid
    pooled = F.adaptive_max_pool2d(m, (h, w))
    return pooled.flatten(1) > 0


def inference_sigmas(pipe, image_seq_len: int, steps: int) -> torch.Tensor:
    """The sigmas ``FluxKontextPipeline`` uses for ``steps`` steps at this image size (before the final 0)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    sch = pipe.scheduler
    mu = calculate_shift(image_seq_len, sch.config.get("base_image_seq_len", 256),
                         sch.config.get("max_image_seq_len", 4096), sch.config.get("base_shift", 0.5),
                         sch.config.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    sch = type(sch).from_config(sch.config)  # never touch the pipeline's scheduler state
    sch.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
    return sch.sigmas[:-1].float().clone()

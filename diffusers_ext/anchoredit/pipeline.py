"""``AnchorEditPipeline``: diffusers' ``WanPipeline`` components driven turn by turn through an anchored KV cache.

The pipeline holds a plain ``WanTransformer3DModel`` (AnchorEdit weights are ordinary Wan weights, fine-tuned), a
Wan VAE, a T5/UMT5 text encoder and its tokenizer. ``AnchorEditConfig`` (memory) and ``SamplerConfig`` (per-turn
schedule) are stored in ``model_index.json`` and applied to the transformer when the first session starts.

Example::

    from diffusers_ext.anchoredit import AnchorEditPipeline
    from diffusers_ext.toy import world

    pipe = AnchorEditPipeline.from_toy()                       # the bundled toy model (offline, verified)
    seq = world.make_sequence("heldout", seed=0, index=0, turns=3)
    out = pipe(seq.source, seq.instructions, seed=0)           # one-shot: every turn, in order
    out.images[-1].save("turn3.png")

    session = pipe.start_session(seq.source, seed=0)           # interactive: one edit() per turn, undo, save/load
    img = session.edit(seq.instructions[0])

A full-size model loads the same way from a Wan2.1-T2V Diffusers folder plus AnchorEdit weights
(``AnchorEditPipeline.from_pretrained(folder, dtype=torch.bfloat16)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import WanPipeline

from ..errors import EditSteerConfigError
from .apply import apply_anchoredit, get_runtime, remove_anchoredit
from .config import AnchorEditConfig, SamplerConfig

logger = logging.getLogger(__name__)

TOY_ID = "toy-anchoredit"


@dataclass
class AnchorEditOutput:
    """Result of :meth:`AnchorEditPipeline.__call__`: one image per turn and the session (to continue or save)."""

    images: list = field(default_factory=list)
    session: object = None


class AnchorEditPipeline(WanPipeline):
    r"""Multi-turn instruction editing with a causal Wan (AnchorEdit).

    Args: the ``WanPipeline`` components (``tokenizer``, ``text_encoder``, ``vae``, ``scheduler``, ``transformer``),
    plus ``anchoredit`` (an :class:`AnchorEditConfig` as a dict), ``sampler`` (a :class:`SamplerConfig` as a dict)
    and ``max_sequence_length`` (instruction tokens per turn; Wan: 512).
    """

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio=None, expand_timesteps: bool = False, anchoredit: dict | None = None,
                 sampler: dict | None = None, max_sequence_length: int = 512):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                         expand_timesteps=expand_timesteps)
        if transformer_2 is not None:
            raise EditSteerConfigError("AnchorEdit uses one transformer; this checkpoint has two (Wan 2.2 A14B)")
        cfg = (AnchorEditConfig.from_dict(anchoredit) if isinstance(anchoredit, dict)
               else (anchoredit or AnchorEditConfig()))
        smp = SamplerConfig.from_dict(sampler) if isinstance(sampler, dict) else (sampler or SamplerConfig())
        self.register_to_config(anchoredit=cfg.to_dict(), sampler=smp.to_dict(),
                                max_sequence_length=int(max_sequence_length))

    # ------------------------------------------------------------------------------------------------------------
    # configuration

    @property
    def anchoredit_config(self) -> AnchorEditConfig:
        return AnchorEditConfig.from_dict(dict(self.config.anchoredit))

    @property
    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig.from_dict(dict(self.config.sampler))

    def set_anchoredit(self, config: AnchorEditConfig | None = None, sampler: SamplerConfig | None = None) -> None:
        """Change the memory settings and/or the default sampler. Sessions started before keep working only if
        the memory settings are unchanged (they check)."""
        if config is not None:
            if not isinstance(config, AnchorEditConfig):
                raise EditSteerConfigError(f"config must be an AnchorEditConfig, got {type(config).__name__}")
            config.check_rope(self.transformer.config.rope_max_seq_len)
            self.register_to_config(anchoredit=config.to_dict())
            if get_runtime(self.transformer) is not None:
                remove_anchoredit(self.transformer)
                apply_anchoredit(self.transformer, config)
        if sampler is not None:
            if not isinstance(sampler, SamplerConfig):
                raise EditSteerConfigError(f"sampler must be a SamplerConfig, got {type(sampler).__name__}")
            self.register_to_config(sampler=sampler.to_dict())

    def runtime(self):
        """The AnchorEdit runtime on the transformer (installed on first use with this pipeline's config)."""
        rt = get_runtime(self.transformer)
        if rt is None:
            rt = apply_anchoredit(self.transformer, self.anchoredit_config)
        elif rt.config != self.anchoredit_config:
            raise EditSteerConfigError("the transformer carries another AnchorEdit config than this pipeline; use "
                                       "pipe.set_anchoredit(config) to change it")
        return rt

    # ------------------------------------------------------------------------------------------------------------
    # encoding / decoding

    @property
    def grid_multiple(self) -> int:
        """Image sides must be multiples of this (VAE spatial factor x transformer patch)."""
        return int(self.vae_scale_factor_spatial * self.transformer.config.patch_size[1])

    def image_to_tensor(self, image) -> torch.Tensor:
        """PIL image, uint8 HxWx3 array, or float tensor [3, H, W] / [1, 3, H, W] in [-1, 1] -> [1, 3, H, W]."""
        if isinstance(image, torch.Tensor):
            t = image.detach().float()
            if t.ndim == 3:
                t = t.unsqueeze(0)
            if t.ndim != 4 or t.shape[:2] != (1, 3):
                raise EditSteerConfigError(f"an image tensor must be [3, H, W] or [1, 3, H, W], got {tuple(t.shape)}")
        else:
            if hasattr(image, "convert"):  # PIL
                image = np.asarray(image.convert("RGB"))
            a = np.asarray(image)
            if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise EditSteerConfigError(f"an image must be a PIL image or a uint8 HxWx3 array, got "
                                           f"{a.dtype} {a.shape}")
            t = torch.tensor(a, dtype=torch.float32).div(127.5).sub(1).permute(2, 0, 1).unsqueeze(0)
        h, w = t.shape[-2:]
        m = self.grid_multiple
        if h % m or w % m or h < m or w < m:
            fit = (max(m, h // m * m), max(m, w // m * m))
            raise EditSteerConfigError(
                f"a {w}x{h} image does not fit this model's patch grid: width and height must be multiples of {m} "
                f"(VAE factor {self.vae_scale_factor_spatial} x patch {self.transformer.config.patch_size[1]}). "
                f"Resize or crop it to e.g. {fit[1]}x{fit[0]} first.")
        return t

    def _latent_stats(self, device, dtype):
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=device, dtype=dtype).view(1, c.z_dim, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=device, dtype=dtype).view(1, c.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """An image as one normalised latent frame ``[1, C, 1, h, w]`` (the VAE posterior mean)."""
        x = self.image_to_tensor(image).to(self.vae.device, self.vae.dtype).unsqueeze(2)
        z = self.vae.encode(x).latent_dist.mode()
        mean, std = self._latent_stats(z.device, z.dtype)
        return ((z - mean) / std).to(self.transformer.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latent frames ``[B, C, 1, h, w]`` -> uint8 images ``[B, H, W, 3]``."""
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._latent_stats(z.device, z.dtype)
        x = self.vae.decode(z * std + mean).sample[:, :, 0]
        return x.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def encode_instructions(self, instructions: list[str]) -> torch.Tensor:
        """Instruction embeddings ``[N, L, D]`` (zero-padded to ``max_sequence_length``, as WanPipeline)."""
        if isinstance(instructions, str) or not all(isinstance(s, str) for s in instructions):
            raise EditSteerConfigError("instructions must be a list of strings")
        L = int(self.config.max_sequence_length)
        ids = self.tokenizer(list(instructions), add_special_tokens=True, verbose=False).input_ids
        longest = max((len(i) for i in ids), default=0)
        if longest > L:
            logger.warning("an instruction has %d tokens; only the first %d are used (max_sequence_length)", longest, L)
        return self._get_t5_prompt_embeds(list(instructions), max_sequence_length=L, device=self.transformer.device,
                                          dtype=self.transformer.dtype)

    # ------------------------------------------------------------------------------------------------------------
    # sessions

    def start_session(self, image, *, seed: int = 0, sampler: SamplerConfig | None = None):
        """Start an :class:`~diffusers_ext.anchoredit.session.AnchorEditSession` from a source image."""
        from .session import AnchorEditSession

        return AnchorEditSession(self, image, seed=seed, sampler=sampler)

    def __call__(self, image, instructions: list[str], *, seed: int = 0, sampler: SamplerConfig | None = None,
                 output_type: str = "pil", callback=None) -> AnchorEditOutput:
        """Run every instruction as one turn, in order; return each turn's image (``output_type`` "pil" or "np")."""
        if isinstance(instructions, str):
            instructions = [instructions]
        cfg = self.anchoredit_config
        if len(instructions) > cfg.max_turns:
            raise EditSteerConfigError(f"{len(instructions)} instructions, but this model is configured for at most "
                                       f"max_turns={cfg.max_turns} turns per session")
        if output_type not in ("pil", "np"):
            raise EditSteerConfigError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        session = self.start_session(image, seed=seed, sampler=sampler)
        images = []
        with self.progress_bar(total=len(instructions)) as bar:
            for text in instructions:
                images.append(session.edit(text, output_type=output_type, callback=callback))
                bar.update()
        return AnchorEditOutput(images=images, session=session)

    # ------------------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_toy(cls, model: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **kwargs) -> "AnchorEditPipeline":
        """The toy AnchorEdit model: the bundled artifact ``toy-anchoredit`` (verified), or a pipeline folder.

        ``dtype`` is handed to ``from_pretrained``: a half dtype loads the weights straight into it and keeps the
        modules diffusers lists in ``_keep_in_fp32_modules`` (Wan: RoPE, time embedder, modulation tables, norms;
        T5: ``wo``) in float32. Casting a loaded pipeline with ``pipe.to(torch.bfloat16)`` casts those too, and the
        error grows turn by turn (toy: 1.0 vs 0.22 grey levels of 255 at turn 3), besides loading in float32 first.
        """
        p = Path(model) if model is not None else None
        if p is not None and p.is_dir():
            folder = p
        else:
            from ..weights import resolve

            folder = resolve(str(model) if model else TOY_ID).path
        pipe = cls.from_pretrained(folder, dtype=dtype, **{"use_safetensors": True, **kwargs})
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


__all__ = ["AnchorEditOutput", "AnchorEditPipeline", "TOY_ID"]

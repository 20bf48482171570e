"""Switti as a per-scale VAR backbone: prompt rows prepared once, one call per scale.

:class:`SwittiBackbone` is what per-scale samplers drive (the plain :class:`~diffusers_ext.switti.SwittiPipeline`
loop and the masked-logit sampler of :mod:`diffusers_ext.mln`). It implements the ``VARBackbone`` protocol of
:mod:`diffusers_ext.mln.sampler` (structurally; this module does not import it), so another next-scale model
(VAR, Infinity, HART) plugs into the same samplers by providing the same few methods.

Rows. The conditioning holds ``groups`` prompt groups of ``batch`` rows each, in order (group 0 = the positive /
target prompt, group 1 = the negative / source prompt). ``scale_logits(k, f_hat, groups=1)`` runs only group 0,
``groups=2`` both (a CFG pair), as the official pipeline drops the negative rows where guidance is off.

Example::

    backbone = SwittiBackbone(pipe.transformer, pipe.vqvae, cond, batch=1)
    f_hat = backbone.empty_fhat()
    logits = backbone.scale_logits(0, f_hat, groups=2)     # (2, 1, V): target row, negative row
"""

from __future__ import annotations

import torch

from .transformer import SwittiConditioning, SwittiTransformer
from .vqvae import SwittiVQVAE


class SwittiBackbone:
    def __init__(self, transformer: SwittiTransformer, vqvae: SwittiVQVAE, cond: SwittiConditioning, batch: int):
        if cond.rows % batch:
            raise ValueError(f"conditioning rows {cond.rows} are not a multiple of the batch {batch}")
        self.transformer, self.vqvae, self.batch = transformer, vqvae, batch
        self.groups = cond.rows // batch
        self._cond = {self.groups: cond}
        self.patch_nums: tuple[int, ...] = tuple(transformer.patch_nums)
        self.num_scales = len(self.patch_nums)
        self.grid = self.patch_nums[-1]
        self.num_blocks = len(transformer.blocks)
        self.nfe = 0  # transformer row-passes, counted per scale (a CFG pair counts 2)

    def conditioning(self, groups: int) -> SwittiConditioning:
        if groups not in self._cond:
            self._cond[groups] = self._cond[self.groups].select(slice(0, groups * self.batch))
        return self._cond[groups]

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook E (V, Cvae) in fp32."""
        return self.vqvae.codebook.float()

    def empty_fhat(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.vqvae.Cvae, self.grid, self.grid, device=self.transformer.device)

    def scale_hidden(self, k: int, f_hat: torch.Tensor | None, groups: int = 1,
                     num_blocks: int | None = None) -> tuple[torch.Tensor, SwittiConditioning]:
        cond = self.conditioning(groups)
        x = self.transformer.scale_input(k, cond, f_hat)
        self.nfe += groups
        return self.transformer.forward_scale(x, k, cond, num_blocks=num_blocks), cond

    def scale_logits(self, k: int, f_hat: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        """Logits (groups * batch, pn*pn, V) in fp32 of scale ``k`` given the accumulated prefix ``f_hat``."""
        h, cond = self.scale_hidden(k, f_hat, groups)
        return self.transformer.get_logits(h, cond).float()

    def embed_tokens(self, k: int, idx: torch.Tensor) -> torch.Tensor:
        """Code map (batch, Cvae, pn, pn) of hard token indices (batch, pn*pn)."""
        pn = self.patch_nums[k]
        return self.codebook[idx].transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)

    def embed_probs(self, k: int, probs: torch.Tensor) -> torch.Tensor:
        """Code map of soft tokens: the probability-weighted codebook mean (batch, Cvae, pn, pn)."""
        pn = self.patch_nums[k]
        return (probs @ self.codebook).transpose(1, 2).reshape(probs.shape[0], -1, pn, pn)

    def accumulate(self, k: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """``f_hat + phi_k(upsample(h_k))`` (VAR's ``get_next_autoregressive_input``), fp32."""
        return f_hat + self.vqvae.quantize.upsample_code(h_BChw, k, self.num_scales, self.grid)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (batch, 3, H, W)."""
        return self.vqvae.fhat_to_img(f_hat).float()

    def tokenize(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Source tokens per scale (batch, pn*pn) and the continuous features ``f`` (batch, Cvae, G, G)."""
        f = self.vqvae.img_to_f(image).float()
        return self.vqvae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=self.patch_nums), f

    def residual_tokens(self, k: int, f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """Tokens (batch, pn*pn) that scale ``k`` of a tokenisation of ``f`` would take over the prefix ``f_hat``:
        the residual ``f - f_hat`` quantised at this scale's grid. Over the source's own prefix these are the
        source's tokens."""
        pn = self.patch_nums[k]
        return self.vqvae.quantize.residual_idx(f.float() - f_hat, pn).reshape(f.shape[0], pn * pn)

    def prefix_fhat(self, idx: list[torch.Tensor], upto: int) -> torch.Tensor:
        """The accumulated features of the first ``upto`` scales of a tokenisation."""
        f_hat = self.empty_fhat()
        for k in range(upto):
            f_hat = self.accumulate(k, f_hat, self.embed_tokens(k, idx[k]))
        return f_hat

    def cross_attention_maps(self, k: int, f_hat: torch.Tensor, groups: int, blocks: range) -> torch.Tensor:
        """Cross-attention probabilities at scale ``k``, averaged over heads and over ``blocks``:
        (groups * batch, pn*pn, T). The model's processors are restored afterwards, also on error."""
        store: list[torch.Tensor] = []
        saved = self.transformer.cross_attn_processors
        rec = {i: (_Recorder(store) if i in blocks else p) for i, p in saved.items()}
        try:
            self.transformer.set_cross_attn_processor(rec)
            self.scale_hidden(k, f_hat, groups, num_blocks=max(blocks) + 1)
        finally:
            self.transformer.set_cross_attn_processor(saved)
        return torch.stack(store).mean(0)


class _Recorder:
    """Cross-attention processor that computes the probabilities explicitly and keeps their head mean."""

    def __init__(self, store: list):
        self.store: list = store

    def __call__(self, attn, q, k, v, bias):
        w = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        if bias is not None:
            w = w + bias.float()
        p = w.softmax(-1)
        self.store.append(p.mean(1))
        return (p @ v.float()).to(q.dtype)


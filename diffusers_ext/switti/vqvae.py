"""Switti's multi-scale residual VQ-VAE as a diffusers ``ModelMixin`` / ``ConfigMixin``.

A port of ``VQVAE`` / ``VQVAEHF`` (``yandex-research/switti``, ``models/vqvae.py``, ``models/basic_vae.py``,
``models/quant.py``; the VAR tokenizer), written for this pack with the official module and parameter names, so
``yresearch/VQVAE-Switti`` loads by its own names. One shared codebook ``E`` (V x Cvae); an image's features
``f = quant_conv(encoder(x))`` on the final G x G grid are quantised coarse to fine: at scale k the residual is
area-resized to ``pn_k``, snapped to its nearest code, bicubic-upsampled back to G, passed through a residual conv
``phi_k`` and added to ``f_hat``.

The architecture widths (``ch``, ``ch_mult``, ``num_res_blocks``, attention) are config values whose defaults are
the official ones (``ch=160, ch_mult=(1, 1, 2, 2, 4)``: downsample 16); the toy model uses smaller ones.

Example::

    import torch
    from diffusers_ext.switti import SwittiVQVAE
    vq = SwittiVQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                     v_patch_nums=(1, 2, 4, 8)).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    idx = vq.img_to_idxBl(x)                   # 4 scales of token indices: (1, 1), (1, 4), (1, 16), (1, 64)
    rec = vq.idxBl_to_img(idx)                 # (1, 3, 16, 16) in [-1, 1]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .schedules import validate_patch_nums

# ----------------------------------------------------------------------------------------------------------------
# encoder / decoder (names as in the official models/basic_vae.py)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.C = ch
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.C, H * W).transpose(-1, -2).unbind(1)  # B, HW, C
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=self.C ** -0.5)[:, 0]
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, self.C, H, W))


def _attn(ch: int, groups: int, on: bool) -> nn.Module:
    return AttnBlock(ch, groups) if on else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True, groups: int = 32):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            b_in, b_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(b_in, b_out, groups, dropout))
                b_in = b_out
                if i == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(b_in, groups))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i != self.num_resolutions - 1:
                down.downsample = Downsample2x(b_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(b_in, b_in, groups, dropout)
        self.mid.attn_1 = _attn(b_in, groups, using_mid_sa)
        self.mid.block_2 = ResnetBlock(b_in, b_in, groups, dropout)
        self.norm_out = _norm(b_in, groups)
        self.conv_out = nn.Conv2d(b_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j in range(self.num_res_blocks):
                h = down.block[j](h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True, groups: int = 32):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        b_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, b_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(b_in, b_in, groups, dropout)
        self.mid.attn_1 = _attn(b_in, groups, using_mid_sa)
        self.mid.block_2 = ResnetBlock(b_in, b_in, groups, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            b_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(b_in, b_out, groups, dropout))
                b_in = b_out
                if i == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(b_in, groups))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i != 0:
                up.upsample = Upsample2x(b_in)
            self.up.insert(0, up)
        self.norm_out = _norm(b_in, groups)
        self.conv_out = nn.Conv2d(b_in, in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j in range(self.num_res_blocks + 1):
                h = up.block[j](h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# residual quantiser (names as in the official models/quant.py)


class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) h + r conv3x3(h)``: the per-scale residual convolution."""

    def __init__(self, dim: int, quant_resi: float):
        super().__init__(dim, dim, 3, 1, 1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul(self.resi_ratio)


def _ticks(k: int) -> np.ndarray:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


class PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _):
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float):
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))]


class PhiNonShared(nn.ModuleList):
    def __init__(self, qresi: list):
        super().__init__(qresi)
        self.ticks = _ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float):
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - at_from_0_to_1))))


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool = False, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = (), quant_resi: float = 0.5,
                 share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm, self.beta = vocab_size, Cvae, using_znorm, beta
        self.v_patch_nums = tuple(v_patch_nums)

        def phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([phi() for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def phi(self, si: int, num_scales: int) -> nn.Module:
        return self.quant_resi[si / (num_scales - 1) if num_scales > 1 else 0.0]

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row (fp32 distances)."""
        E = self.embedding.weight.float()
        z = z_NC.float()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(E.T, dim=0), dim=1)
        d = z.square().sum(1, keepdim=True) + E.square().sum(1)
        d.addmm_(z, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def residual_idx(self, f_rest: torch.Tensor, pn: int) -> torch.Tensor:
        """Tokens (B, pn, pn) of a residual (B, C, G, G) at grid ``pn``: area-resized (not at the final grid),
        nearest code. One scale of the multi-scale residual quantisation."""
        B, C, G, _ = f_rest.shape
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != G else f_rest
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)

    def upsample_code(self, h_BChw: torch.Tensor, si: int, num_scales: int, G: int) -> torch.Tensor:
        """``phi_k(upsample(h))`` in fp32: a scale's code map (B, C, pn, pn) lifted to the final grid."""
        h_BChw = h_BChw.float()
        if si != num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=(G, G), mode="bicubic")
        return self.phi(si, num_scales)(h_BChw.to(self.embedding.weight.dtype)).float()

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums: Sequence[int] | None = None
                           ) -> list[torch.Tensor]:
        """Quantise features coarse to fine; per scale the indices (B, pn*pn) or the accumulated ``f_hat``."""
        B, C, H, W = f_BChw.shape
        pns = tuple(v_patch_nums or self.v_patch_nums)
        if pns[-1] != H or H != W:
            raise ValueError(f"the last scale {pns[-1]} must equal the feature grid {H}x{W}")
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        SN = len(pns)
        for si, pn in enumerate(pns):
            idx = self.residual_idx(f_rest, pn)
            h = self.upsample_code(self.embedding(idx).permute(0, 3, 1, 2).float(), si, SN, H)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, pn * pn))
        return out

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate per-scale code maps (B, C, pn, pn) into the final ``f_hat``."""
        SN = len(ms_h_BChw)
        G = ms_h_BChw[-1].shape[-1]
        f_hat = ms_h_BChw[0].new_zeros(ms_h_BChw[0].shape[0], self.Cvae, G, G, dtype=torch.float32)
        for si, h in enumerate(ms_h_BChw):
            f_hat.add_(self.upsample_code(h.float(), si, SN, G))
        return f_hat

    def idxBl_to_switti_input(self, gt_ms_idx_Bl: list[torch.Tensor], v_patch_nums: Sequence[int] | None = None
                              ) -> torch.Tensor:
        """Teacher-forcing input (B, L - first_l, Cvae): ``f_hat`` after each scale, area-resized to the next."""
        pns = tuple(v_patch_nums or self.v_patch_nums)
        B, C, G, SN = gt_ms_idx_Bl[0].shape[0], self.Cvae, pns[-1], len(pns)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, G, G, dtype=torch.float32)
        nxt = []
        for si in range(SN - 1):
            h = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pns[si], pns[si]).float()
            f_hat.add_(self.upsample_code(h, si, SN, G))
            pn = pns[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, C, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)

    def forward(self, f_BChw: torch.Tensor, v_patch_nums: Sequence[int] | None = None):
        """Training forward: ``(f_hat with straight-through gradients, vq_loss, codes used per scale)``."""
        f = f_BChw.float()
        B, C, H, W = f.shape
        pns = tuple(v_patch_nums or self.v_patch_nums)
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        loss = f.new_zeros(())
        SN = len(pns)
        used = []
        for si, pn in enumerate(pns):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))
            used.append(idx)
            h = self.upsample_code(self.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2), si, SN, H)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.data, f).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / SN
        f_hat = (f_hat.data - f_no_grad) + f
        return f_hat, loss, used


# ----------------------------------------------------------------------------------------------------------------
# the model


class SwittiVQVAE(ModelMixin, ConfigMixin):
    """Switti's multi-scale residual VQ-VAE (VAR tokenizer). Official: ``vocab_size=4096, z_channels=32, ch=160``,
    ``ch_mult=(1, 1, 2, 2, 4)`` (downsample 16), 4 partially shared ``phi`` convs; 108.9 M parameters."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
    ):
        super().__init__()
        self.V, self.Cvae = vocab_size, z_channels
        self.v_patch_nums = validate_patch_nums(v_patch_nums)
        dd = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                  dropout=dropout, using_sa=using_sa, using_mid_sa=using_mid_sa, groups=norm_num_groups)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, using_znorm, beta, default_qresi_counts,
                                         self.v_patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)

    @property
    def codebook(self) -> torch.Tensor:
        """The shared codebook E (V, Cvae)."""
        return self.quantize.embedding.weight

    def img_to_f(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous features ``quant_conv(encoder(x))`` (B, Cvae, G, G) of images in [-1, 1]."""
        return self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))

    def img_to_idxBl(self, x: torch.Tensor, v_patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=False, v_patch_nums=v_patch_nums)

    def img_to_fhat(self, x: torch.Tensor, v_patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True, v_patch_nums=v_patch_nums)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode accumulated features to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        B = ms_idx_Bl[0].shape[0]
        hs = []
        for idx in ms_idx_Bl:
            pn = math.isqrt(idx.shape[1])
            hs.append(self.quantize.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.fhat_to_img(self.quantize.embed_to_fhat(hs))

    def forward(self, x: torch.Tensor, v_patch_nums: Sequence[int] | None = None):
        """Training forward: ``(reconstruction, vq_loss, codes used per scale)``."""
        f_hat, vq_loss, used = self.quantize(self.img_to_f(x), v_patch_nums)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, used

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # The hit statistics are training-only and sized by the schedule the checkpoint was saved with (the Hub
        # checkpoint: 14 scales); keep ours when the sizes differ, as the official load_state_dict does.
        key = prefix + "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict[key] = self.quantize.ema_vocab_hit_SV.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

"""The Switti scale-wise transformer as a diffusers ``ModelMixin`` / ``ConfigMixin``.

A port of ``Switti`` / ``SwittiHF`` (``yandex-research/switti``, ``models/switti.py`` and
``models/basic_switti.py``), written for this pack: module and parameter names equal the official ones, so the Hub
checkpoints (``yresearch/Switti``, ``yresearch/Switti-1024``) load by their own names (``tests/data/
switti_official_state_dict.json`` lists them; a test compares). What differs from the official module:

* the text widths (``context_dim`` = CLIP-L + bigG hidden sizes, ``pooled_embed_size`` = bigG width) are config
  values (the official class hard-codes 2048 / 1280), so tiny models of the same class can be built;
* the block-diagonal training mask ``attn_bias_for_masking`` (L x L, 357 MB at 1024 px) is built on demand and is not
  a state-dict buffer; official checkpoints that carry it load with the entry ignored;
* inference runs one scale at a time (:meth:`SwittiTransformer.forward_scale`): with ``use_ar=False`` the tokens of
  a scale attend only within the scale, so no self-attention KV cache is needed; the text keys/values are computed
  once per prompt (:meth:`prepare_conditioning`) as the official cross-attention cache does;
* cross-attention goes through a swappable processor (:meth:`set_cross_attn_processor`, diffusers style), which is
  how MLN records cross-attention maps without touching the model code;
* no CUDA-only autocast, no apex/flash-attn paths; runs on CPU in fp32 and on GPU in bf16/fp16;
* the crop condition's Fourier features stay in float32 whatever the model's dtype (:class:`Float32Fourier`): their
  phases reach ~1e4 rad, which bf16 / fp16 cannot hold. This is the model as trained (fp32 weights under autocast)
  and the official fp32 pipeline exactly; the official ``SwittiPipeline`` in bf16 rounds them (cosine to fp32 0.6-0.7
  with random weights).

Example::

    import torch
    from diffusers_ext.switti import SwittiTransformer
    model = SwittiTransformer(depth=2, embed_dim=64, num_heads=2, V=64, Cvae=8, context_dim=48,
                              pooled_embed_size=32, patch_nums=(1, 2, 4)).eval()
    cond = model.prepare_conditioning(torch.randn(1, 7, 48), torch.randn(1, 32), torch.zeros(1, 7))
    h = model.forward_scale(model.scale_input(0, cond), 0, cond)
    logits = model.get_logits(h, cond)            # (1, 1, 64): one token, V = 64
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import GaussianFourierProjection
from diffusers.models.modeling_utils import ModelMixin

from .schedules import scale_slices, validate_patch_nums

# ----------------------------------------------------------------------------------------------------------------
# conditioning


class Float32Fourier(GaussianFourierProjection):
    """``GaussianFourierProjection`` whose random frequencies (``weight``) stay float32 through ``.to(dtype)``,
    ``.half()`` and the like (devices still move), and which computes in float32: the caller casts the output."""

    def _apply(self, fn, recurse=True):
        w = self.weight.data
        super()._apply(fn, recurse)
        if w.dtype == torch.float32 and self.weight.dtype != torch.float32 and not w.is_meta:
            self.weight.data = w.to(self.weight.device)  # the original, not a round trip through the narrow type
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


def crop_condition(heights, widths, base_size: int = 512) -> torch.Tensor:
    """Switti's crop condition ``(orig_h, orig_w, crop_top, crop_left)`` for images of the given sizes.

    The original size is rescaled so its short side is ``base_size``; crops are centred. A square image of any size
    gives ``(512, 512, 0, 0)``.
    """
    hw = torch.tensor([[int(h), int(w)] for h, w in zip(heights, widths)], dtype=torch.int)
    ratio = base_size / hw.min(-1)[0]
    orig = (hw * ratio[:, None]).to(torch.int)
    crop = ((orig - base_size) // 2).clamp(min=0)
    return torch.cat([orig, crop], dim=1)


@dataclass
class SwittiConditioning:
    """Everything a scale's forward needs from the prompts, for ``rows`` batch rows.

    ``cond`` = ``text_pooler(pooled)`` (AdaLN condition and start token), ``crop`` = crop-condition embedding,
    ``context`` / ``context_bias`` = the concatenated CLIP hidden states and their additive padding mask
    (0 keep, -inf pad), ``kv`` = per-block text keys and values (computed once, reused at every scale).
    """

    cond: torch.Tensor
    crop: torch.Tensor | None
    context: torch.Tensor
    context_bias: torch.Tensor | None
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def rows(self) -> int:
        return self.cond.shape[0]

    def select(self, index) -> "SwittiConditioning":
        """The conditioning of a subset of rows (a slice, a list or a tensor of row indices)."""
        def s(t):
            return None if t is None else t[index]
        return replace(self, cond=s(self.cond), crop=s(self.crop), context=s(self.context),
                       context_bias=s(self.context_bias), kv=[(k[index], v[index]) for k, v in self.kv])

    @staticmethod
    def cat(parts: list["SwittiConditioning"]) -> "SwittiConditioning":
        def c(ts):
            return None if ts[0] is None else torch.cat(ts, 0)
        return SwittiConditioning(
            cond=c([p.cond for p in parts]), crop=c([p.crop for p in parts]), context=c([p.context for p in parts]),
            context_bias=c([p.context_bias for p in parts]),
            kv=[(torch.cat([p.kv[i][0] for p in parts]), torch.cat([p.kv[i][1] for p in parts]))
                for i in range(len(parts[0].kv))])


# ----------------------------------------------------------------------------------------------------------------
# rotary position embedding (2-D, per scale, normalised to the scale's extent)


def axial_rope_angles(head_dim: int, side: int, theta: float, norm_coeff: float) -> torch.Tensor:
    """Angles ``(side*side, head_dim // 2)`` of the official ``compute_axial_cis`` (x half, then y half)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)) * norm_coeff
    t = torch.arange(side * side, dtype=torch.float32)
    tx, ty = t % side, torch.div(t, side, rounding_mode="floor")
    return torch.cat([torch.outer(tx, freqs), torch.outer(ty, freqs)], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (B, H, L, D) by the angles (L, D/2), in fp32, as a complex product would."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# blocks (names as in the official models/basic_switti.py)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, ff_mult: float = 8 / 3):
        super().__init__()
        hidden = int(dim * ff_mult)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FFN(nn.Module):
    """The GELU MLP used when ``use_swiglu_ffn=False``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.qk_norm = qk_norm
        self.q_norm = nn.LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False)
        self.to_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=True)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, attn_bias=None, rope=None):
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, C).unbind(2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwittiCrossAttnProcessor:
    """Default cross-attention processor: scaled-dot-product attention of image queries over text keys.

    A processor is called as ``processor(attn, q, k, v, bias) -> out`` with ``q`` (B, H, L, D), ``k``/``v``
    (B, H, T, D), ``bias`` (B, 1, 1, T) additive or None, and returns (B, H, L, D).
    """

    def __call__(self, attn: "CrossAttention", q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)


class CrossAttention(nn.Module):
    def __init__(self, embed_dim: int, context_dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.qk_norm = qk_norm
        self.q_norm = nn.LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(embed_dim, eps=1e-6, elementwise_affine=False)
        self.to_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.to_kv = nn.Linear(context_dim, embed_dim * 2, bias=True)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.processor: Callable = SwittiCrossAttnProcessor()

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys and values (B, H, T, D) of an already normalised context."""
        B, T, _ = context.shape
        k, v = self.to_kv(context).view(B, T, 2, -1).unbind(2)
        if self.qk_norm:
            k = self.k_norm(k)
        return (k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2))

    def forward(self, x, kv, context_bias=None):
        B, L, C = x.shape
        q = self.to_q(x)
        if self.qk_norm:
            q = self.q_norm(q)
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv
        bias = None if context_bias is None else context_bias[:, None, None, :].to(q.dtype)
        out = self.processor(self, q, k, v, bias)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfCrossAttn(nn.Module):
    """One Switti block: AdaLN-modulated self-attention, cross-attention to text, (SwiGLU) FFN, with sandwich
    RMSNorms (``*_norm1`` before, ``*_norm2`` after each sub-layer)."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = True, use_swiglu_ffn: bool = True, norm_eps: float = 1e-6,
                 use_crop_cond: bool = True):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, qk_norm)
        self.cross_attn = CrossAttention(embed_dim, context_dim, num_heads, qk_norm)
        self.ffn = SwiGLUFFN(embed_dim) if use_swiglu_ffn else FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.self_attention_norm1 = RMSNorm(embed_dim, norm_eps)
        self.self_attention_norm2 = RMSNorm(embed_dim, norm_eps)
        self.cross_attention_norm1 = RMSNorm(embed_dim, norm_eps)
        self.cross_attention_norm2 = RMSNorm(embed_dim, norm_eps)
        self.ffn_norm1 = RMSNorm(embed_dim, norm_eps)
        self.ffn_norm2 = RMSNorm(embed_dim, norm_eps)
        self.attention_y_norm = RMSNorm(context_dim, norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))
        self.use_crop_cond = use_crop_cond
        if use_crop_cond:
            self.crop_cond_scales = nn.Parameter(torch.zeros(1, cond_dim))

    def context_kv(self, context: torch.Tensor):
        return self.cross_attn.context_kv(self.attention_y_norm(context))

    def forward(self, x, cond_BD, kv, context_bias=None, crop_cond=None, attn_bias=None, rope=None):
        if self.use_crop_cond:
            cond_BD = cond_BD + self.crop_cond_scales * crop_cond
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.self_attention_norm2(
            self.attn(self.self_attention_norm1(x).mul(scale1.add(1)).add(shift1), attn_bias=attn_bias, rope=rope)
        ).mul(gamma1)
        x = x + self.cross_attention_norm2(self.cross_attn(self.cross_attention_norm1(x), kv, context_bias))
        x = x + self.ffn_norm2(self.ffn(self.ffn_norm1(x).mul(scale2.add(1)).add(shift2))).mul(gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


# ----------------------------------------------------------------------------------------------------------------
# the model


class SwittiTransformer(ModelMixin, ConfigMixin):
    """Switti: a non-autoregressive-within-scale, scale-wise text-to-image transformer over residual VQ tokens.

    Official configuration (``SwittiHF(depth=30)``): ``depth=30, embed_dim=1920, num_heads=30`` (width = 64 x depth,
    one head per block), ``V=4096, Cvae=32``, SwiGLU FFN, 2-D RoPE, crop conditioning, 2.47 B parameters.
    """

    config_name = "config.json"
    # The official state dict may carry the L x L training mask; it is rebuilt on demand here.
    _keys_to_ignore_on_load_unexpected = [r"^attn_bias_for_masking$"]
    _no_split_modules = ["AdaLNSelfCrossAttn"]
    _keep_in_fp32_modules = ["crop_embed"]  # see Float32Fourier

    @register_to_config
    def __init__(
        self,
        Cvae: int = 32,
        V: int = 4096,
        depth: int = 30,
        embed_dim: int = 1920,
        num_heads: int = 30,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
        rope: bool = True,
        rope_theta: float = 10000,
        rope_size: float = 128,
        use_swiglu_ffn: bool = True,
        use_ar: bool = False,
        use_crop_cond: bool = True,
        context_dim: int = 2048,
        pooled_embed_size: int = 1280,
        crop_base_size: int = 512,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if rope and (embed_dim // num_heads) % 4:
            raise ValueError("2-D RoPE needs a head dim divisible by 4")
        if use_crop_cond and embed_dim % 8:
            raise ValueError("the crop condition needs embed_dim divisible by 8")
        self.patch_nums = validate_patch_nums(patch_nums)
        self.C = self.D = embed_dim
        self.Cvae, self.V = Cvae, V
        self.num_heads = num_heads
        self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.slices = scale_slices(self.patch_nums)

        self.word_embed = nn.Linear(Cvae, self.C)
        self.text_pooler = nn.Linear(pooled_embed_size, self.D)
        init_std = math.sqrt(1 / self.C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        if not rope:
            self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
            nn.init.trunc_normal_(self.pos_1LC.data, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)

        self.blocks = nn.ModuleList([
            AdaLNSelfCrossAttn(self.C, self.D, num_heads, context_dim, mlp_ratio, attn_l2_norm, use_swiglu_ffn,
                               norm_eps, use_crop_cond)
            for _ in range(depth)
        ])
        if use_crop_cond:
            self.crop_embed = Float32Fourier(self.D // 2 // 4, set_W_to_weight=False, log=False,
                                             flip_sin_to_cos=False)
            self.crop_proj = nn.Linear(self.D, self.D)
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)]).view(1, self.L)
        self.register_buffer("lvl_1L", lvl)
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gradient_checkpointing = False

    # -- conditioning -------------------------------------------------------------------------------------------

    def prepare_conditioning(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                             prompt_attn_bias: torch.Tensor | None, image_size: tuple[int, int] | None = None
                             ) -> SwittiConditioning:
        """Project the prompts once: AdaLN condition, crop condition and every block's text keys/values.

        ``prompt_embeds`` (B, T, context_dim), ``pooled_prompt_embeds`` (B, pooled_embed_size),
        ``prompt_attn_bias`` (B, T) additive (0 keep, -inf padding) or None. ``image_size`` only feeds the crop
        condition; any square size gives the same condition.
        """
        dtype, device = self.word_embed.weight.dtype, self.word_embed.weight.device
        B = prompt_embeds.shape[0]
        cond = self.text_pooler(pooled_prompt_embeds.to(device=device, dtype=dtype))
        crop = None
        if self.config.use_crop_cond:
            h, w = image_size or (self.config.crop_base_size, self.config.crop_base_size)
            coords = crop_condition([h] * B, [w] * B, self.config.crop_base_size).to(cond.device)
            crop = self.crop_proj(self.crop_embed(coords.view(-1)).reshape(B, self.D).to(dtype))
        context = prompt_embeds.to(device=device, dtype=dtype)
        bias = None if prompt_attn_bias is None else prompt_attn_bias.to(device=device, dtype=torch.float32)
        kv = [blk.context_kv(context) for blk in self.blocks]
        return SwittiConditioning(cond=cond, crop=crop, context=context, context_bias=bias, kv=kv)

    # -- per-scale inference ------------------------------------------------------------------------------------

    def lvl_pos(self, scale_index: int) -> torch.Tensor:
        """Level (+ absolute position, without RoPE) embedding of one scale's tokens: (1, pn*pn, C)."""
        b, e = self.slices[scale_index]
        pos = self.lvl_embed(self.lvl_1L[:, b:e])
        if not self.config.rope:
            pos = pos + self.pos_1LC[:, b:e]
        return pos

    def scale_input(self, scale_index: int, cond: SwittiConditioning, f_hat: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The token embeddings that predict scale ``scale_index``: the start token at scale 0, else the
        accumulated features ``f_hat`` (B, Cvae, G, G) area-resized to the scale's grid. ``f_hat`` rows are tiled
        to the conditioning's rows (e.g. one image, CFG pair of prompts)."""
        if scale_index == 0:
            return cond.cond.unsqueeze(1) + self.pos_start.expand(cond.rows, self.first_l, -1) + self.lvl_pos(0)
        pn = self.patch_nums[scale_index]
        x = F.interpolate(f_hat.float(), size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
        x = self.word_embed(x.to(self.word_embed.weight.dtype)) + self.lvl_pos(scale_index)
        if cond.rows != x.shape[0]:
            if cond.rows % x.shape[0]:
                raise ValueError(f"{x.shape[0]} feature rows cannot be tiled to {cond.rows} conditioning rows")
            x = x.repeat(cond.rows // x.shape[0], 1, 1)
        return x

    def rope_for_scale(self, scale_index: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.config.rope:
            return None
        key = (scale_index, str(device))
        if key not in self._rope_cache:
            pn = self.patch_nums[scale_index]
            norm = self.config.rope_size / (pn - 1 if pn > 1 else 1)
            ang = axial_rope_angles(self.C // self.num_heads, pn, self.config.rope_theta, norm).to(device)
            self._rope_cache[key] = (ang.cos(), ang.sin())
        return self._rope_cache[key]

    def forward_scale(self, x: torch.Tensor, scale_index: int, cond: SwittiConditioning,
                      num_blocks: int | None = None) -> torch.Tensor:
        """Run the blocks on one scale's tokens ``x`` (rows, pn*pn, C); tokens attend within the scale only.

        ``num_blocks`` stops early (e.g. when only cross-attention maps of the first blocks are needed).
        """
        if self.config.use_ar:
            raise NotImplementedError("Switti-AR (use_ar=True) needs a cross-scale KV cache; only the non-AR "
                                      "checkpoints (yresearch/Switti, yresearch/Switti-1024) are supported")
        rope = self.rope_for_scale(scale_index, x.device)
        n = len(self.blocks) if num_blocks is None else num_blocks
        for i in range(n):
            x = self.blocks[i](x, cond.cond, cond.kv[i], context_bias=cond.context_bias, crop_cond=cond.crop,
                               rope=rope)
        return x

    def get_logits(self, h: torch.Tensor, cond: SwittiConditioning | torch.Tensor) -> torch.Tensor:
        """Token logits (rows, l, V) from the last hidden states."""
        cond_BD = cond.cond if isinstance(cond, SwittiConditioning) else cond
        return self.head(self.head_nm(h, cond_BD))

    # -- cross-attention processors (diffusers style) -----------------------------------------------------------

    @property
    def cross_attn_processors(self) -> dict[int, Callable]:
        """Block index -> the processor of its cross-attention."""
        return {i: b.cross_attn.processor for i, b in enumerate(self.blocks)}

    def set_cross_attn_processor(self, processor: Callable | dict[int, Callable]) -> None:
        """Set one processor for every block, or a dict with exactly one entry per block index."""
        if isinstance(processor, dict):
            if set(processor) != set(range(len(self.blocks))):
                raise ValueError(f"a processor dict needs exactly the keys 0..{len(self.blocks) - 1}")
            for i, p in processor.items():
                self.blocks[i].cross_attn.processor = p
        else:
            for b in self.blocks:
                b.cross_attn.processor = processor

    # -- teacher-forced training forward (official signature) ---------------------------------------------------

    def attn_bias_for_masking(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The (1, 1, L, L) training mask: block-diagonal (``use_ar=False``) or block-causal (``use_ar=True``)."""
        d = self.lvl_1L.view(1, self.L, 1).to(device)
        dT = d.transpose(1, 2)
        keep = (d >= dT) if self.config.use_ar else (d == dT)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~keep, float("-inf")).view(1, 1, self.L,
                                                                                                  self.L)

    def forward(self, x_BLCv_wo_first_l: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor, prompt_attn_bias: torch.Tensor | None,
                batch_height: list[int] | None = None, batch_width: list[int] | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) of every scale at once, as the official ``Switti.forward``.

        ``x_BLCv_wo_first_l`` (B, L - first_l, Cvae) = the area-resized accumulated features of each next scale
        (:meth:`SwittiVQVAE.idxBl_to_switti_input`).
        """
        B = x_BLCv_wo_first_l.shape[0]
        size = None if batch_height is None else (int(batch_height[0]), int(batch_width[0]))
        cond = self.prepare_conditioning(prompt_embeds, pooled_prompt_embeds, prompt_attn_bias, size)
        sos = cond.cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1))
        if not self.config.rope:
            x = x + self.pos_1LC
        rope = None
        if self.config.rope:
            parts = [self.rope_for_scale(i, x.device) for i in range(len(self.patch_nums))]
            rope = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        mask = self.attn_bias_for_masking(x.device)
        for i, blk in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, cond.cond, cond.kv[i], cond.context_bias, cond.crop,
                                                      mask, rope, use_reentrant=False)
            else:
                x = blk(x, cond.cond, cond.kv[i], cond.context_bias, cond.crop, mask, rope)
        return self.get_logits(x, cond.cond)

    # -- initialisation (official init_weights, for training from scratch) --------------------------------------

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1) -> None:
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
        self.head.weight.data.mul_(init_head)
        self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        depth = len(self.blocks)
        for b in self.blocks:
            b.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            b.cross_attn.proj.weight.data.div_(math.sqrt(2 * depth))
            if hasattr(b.ffn, "fc2"):
                b.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            b.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
            b.ada_lin[-1].weight.data[: 2 * self.C].mul_(init_adaln_gamma)
            b.ada_lin[-1].bias.data.zero_()

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, L={self.L}"

    def _apply(self, fn, *args: Any, **kwargs: Any):  # device/dtype moves invalidate the RoPE cache
        self._rope_cache = {}
        return super()._apply(fn, *args, **kwargs)

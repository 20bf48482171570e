"""The Inline Critic on ComfyUI's own Flux (FLUX.1 Kontext) and Qwen-Image models, through ``ModelPatcher`` patches.

Nothing of the models is forked or swapped; :func:`apply_critic` patches a ``clone()`` of the MODEL with:

* a ``DIFFUSION_MODEL`` wrapper: per forward, the call state (text length, target tokens, their grid, the sigma);
  for Qwen-Image it also appends the critic rows to ``context`` (conditioning space, before ``txt_norm``/``txt_in``,
  so they take the text RoPE positions right after the prompt: ComfyUI does not pad Qwen-Image prompts, and its
  attention ignores any mask; the diffusers adapter puts every sample's rows right after its own unpadded prompt
  too) and a 1 to ``attention_mask``; it checks that the attention override is still the critic's; after the
  forward it records the error map of the conditional rows;
* Flux only: a ``post_input`` patch appending the critic rows to ``txt`` and their RoPE ids ``(3, 0, 0)`` to
  ``txt_ids`` (the rows are dormant until block ``l_in``, so their value before it never matters); it refuses image
  tokens with RoPE index 3, the critic's (a third reference image under ``ref_latents_method="index"``);
* a ``patches_replace["dit"]`` entry per block (chaining any entry already there): it tells the attention override
  which block runs, writes the learned tokens into the critic rows at the input of block ``l_in`` and runs the
  critique head after each block ``l_c``;
* ``transformer_options["optimized_attention_override"]``: every block's joint attention goes through
  ``InlineCritic.attention`` (``diffusers_ext.critic.core``), with ComfyUI's own attention kernel as ``attn_fn``.
  An override set before the critic is chained; one set after it (by a node downstream of Apply Inline Critic)
  must chain to the critic's, or sampling stops with :class:`EditSteerError`: the block patches would still write
  the critic rows, and the model would attend to them unscaled and unmasked.

The critic's mathematics are the core's; this module only moves tensors between ComfyUI's layouts and the core's
documented ``BSHD`` layout, so one weight file gives the diffusers adapter's predictions (tested to 1e-4).
ComfyUI's DiT forward is not autograd-safe: inference only (train in diffusers).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension

from diffusers_ext.errors import EditSteerConfigError, EditSteerError, ModelFamilyError

logger = logging.getLogger("EditSteer")

WRAPPER_KEY = "editsteer_inline_critic"
MODES = ("off", "critique", "steer")


# -- model families -------------------------------------------------------------------------------------------------
def _flux_class():
    import comfy.ldm.flux.model

    return comfy.ldm.flux.model.Flux


def _qwen_class():
    import comfy.ldm.qwen_image.model

    return comfy.ldm.qwen_image.model.QwenImageTransformer2DModel


def describe_model(model_patcher) -> dict:
    """Family and size of a ComfyUI MODEL, in the keys ``InlineCritic.check_compatible`` reads."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(dm).__name__ if dm is not None else type(base).__name__
    if dm is not None and isinstance(dm, _flux_class()) and hasattr(dm, "double_blocks"):
        return {"arch": "flux", "class": f"ComfyUI {name}", "width": int(dm.hidden_size),
                "num_heads": int(dm.num_heads),
                "num_double": len(dm.double_blocks), "depth": len(dm.double_blocks) + len(dm.single_blocks),
                "context_dim": int(dm.txt_in.in_features), "patch_size": int(dm.patch_size)}
    if dm is not None and isinstance(dm, _qwen_class()):
        blocks = dm.transformer_blocks
        return {"arch": "qwen-image", "class": f"ComfyUI {name}", "width": int(dm.inner_dim),
                "num_heads": int(blocks[0].attn.heads), "num_double": None, "depth": len(blocks),
                "context_dim": int(dm.txt_in.in_features), "patch_size": int(dm.patch_size)}
    raise ModelFamilyError(
        f"the Inline Critic runs on ComfyUI's Flux (FLUX.1 Kontext) and Qwen-Image (Qwen-Image-Edit) models; this "
        f"MODEL's diffusion model is {name} ({type(base).__module__}.{type(base).__name__}). A loader that replaces "
        "the model class (e.g. a quantised engine) bypasses the patch points the critic needs")


# -- layouts ------------------------------------------------------------------------------------------------------
def _to_bshd(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:  # (B, H, S, D)
        return t.transpose(1, 2)
    b, s, hd = t.shape
    return t.view(b, s, heads, hd // heads)


def _from_bshd(t: torch.Tensor, skip_reshape: bool) -> torch.Tensor:
    # contiguous, as the model's own tensors are: the kernel then runs exactly as without the critic
    return t.transpose(1, 2).contiguous() if skip_reshape else t.flatten(2).contiguous()


@dataclass
class CriticRecord:
    sigma: float
    error_map: torch.Tensor  # (B_cond, h, w) float32 on CPU


@dataclass
class CriticRecorder:
    """Error maps of the latest sampling run through a critic-patched MODEL (shared by its clones)."""

    records: list = field(default_factory=list)
    runs: int = 0

    def reset(self) -> None:
        self.records = []
        self.runs += 1

    def mean_map(self) -> torch.Tensor | None:
        """``(B, h, w)``: the conditional maps averaged over the denoising steps (the diffusers pipelines' map).

        Only the steps that ran the final batch count: after a VeriLatent search, the chosen candidates' last
        ``T - k`` steps (the early steps ran every candidate as one batch)."""
        maps = [r.error_map for r in self.records]
        if not maps:
            return None
        shape = maps[-1].shape
        return torch.stack([m for m in maps if m.shape == shape]).mean(0)


@dataclass
class _Call:
    active: bool = False
    n_txt: int = 0
    n_target: int = 0
    grid: tuple[int, int] = (0, 0)
    sigma: float | None = None
    block: int = -1
    maps: dict = field(default_factory=dict)


class CriticPatch:
    """One critic on one (cloned) MODEL: the wrapper, patches and attention override of the module docstring."""

    def __init__(self, critic, desc: dict, mode: str, scale: float, recorder: CriticRecorder | None = None,
                 previous_override=None):
        self.critic = critic.eval()
        self.arch = desc["arch"]
        self.num_double = desc["num_double"] or 0
        self.patch = desc["patch_size"]
        self.mode = mode
        self.scale = float(scale)
        self.recorder = recorder or CriticRecorder()
        self.previous_override = previous_override
        self.call = _Call()

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options: share the critic and recorder
        return self

    # -- per forward ------------------------------------------------------------------------------------------
    def _begin(self, x, timestep, context, transformer_options) -> None:
        h = (x.shape[-2] + self.patch // 2) // self.patch
        w = (x.shape[-1] + self.patch // 2) // self.patch
        sig = transformer_options.get("sigmas", timestep)
        self.call = _Call(active=True, n_txt=int(context.shape[1]), n_target=h * w, grid=(h, w),
                          sigma=float(sig.flatten()[0]) if torch.is_tensor(sig) else None)
        p = next(iter(self.critic.parameters()))
        if p.device != x.device:
            self.critic.to(x.device)

    def _end(self, transformer_options) -> None:
        call = self.call
        self.call = _Call()
        if not call.maps:
            return
        m = torch.stack(list(call.maps.values())).mean(0).float()  # (B, n_target)
        cou = transformer_options.get("cond_or_uncond") or [0]
        chunk = m.shape[0] // max(1, len(cou))
        rows = [m[i * chunk:(i + 1) * chunk] for i, c in enumerate(cou) if c == 0] if chunk else []
        if rows:
            cond = torch.cat(rows).reshape(-1, *call.grid).cpu()
            self.recorder.records.append(CriticRecord(call.sigma if call.sigma is not None else math.nan, cond))

    def diffusion_model_wrapper(self, executor, x, timestep, context, *args, **kwargs):
        """``WrappersMP.DIFFUSION_MODEL`` around ``Flux._forward`` / ``QwenImageTransformer2DModel._forward``."""
        to = kwargs.get("transformer_options")
        if to is None:  # positional: Flux (y, guidance, ref_latents, control, to), Qwen (mask, guidance, refs, to)
            to = args[4] if self.arch == "flux" else args[3]
        self._check_override(to)
        self._begin(x, timestep, context, to)
        try:
            if self.arch == "qwen-image":
                n_c = self.critic.config.n_tokens
                context = torch.cat([context, context.new_zeros(context.shape[0], n_c, context.shape[2])], dim=1)
                args = list(args)
                mask = kwargs.get("attention_mask", args[0] if args else None)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], n_c)], dim=1)
                    if "attention_mask" in kwargs:
                        kwargs["attention_mask"] = mask
                    else:
                        args[0] = mask
            out = executor(x, timestep, context, *args, **kwargs)
            self._end(to)
            return out
        finally:
            self.call = _Call()

    def _check_override(self, transformer_options) -> None:
        found = transformer_options.get("optimized_attention_override")
        if not chains_to(found, self.attention_override):
            name = "none" if found is None else getattr(found, "__qualname__", type(found).__name__)
            raise EditSteerError(
                "the Inline Critic's attention override was replaced on this MODEL (transformer_options["
                f"'optimized_attention_override'] is now {name}), probably by a node applied after Apply Inline "
                "Critic; every block would attend to the critic rows unscaled and unmasked. Apply that node before "
                "Apply Inline Critic (the critic chains to an override set before it), or leave it out")

    def post_input(self, d: dict) -> dict:
        """Flux ``post_input`` patch: critic rows at the end of the text stream, RoPE id (3, 0, 0)."""
        from diffusers_ext.critic.config import FLUX_CRITIC_ROPE_ID

        if not self.call.active:
            return d
        n_c = self.critic.config.n_tokens
        txt, ids = d["txt"], d["txt_ids"]
        img_ids = d.get("img_ids")
        if img_ids is not None and bool((img_ids[..., 0] == FLUX_CRITIC_ROPE_ID[0]).any()):
            raise EditSteerConfigError(
                f"image tokens have RoPE index {FLUX_CRITIC_ROPE_ID[0]}, the Inline Critic's own (its tokens sit at "
                f"{FLUX_CRITIC_ROPE_ID}, fixed by training): with ref_latents_method 'index' ComfyUI numbers the "
                "reference images 1, 2, 3, ..., so a third reference would share the critic's position. Use at most "
                "two reference images with the 'index' method, or the 'offset' method (Kontext's default)")
        d["txt"] = torch.cat([txt, txt.new_zeros(txt.shape[0], n_c, txt.shape[2])], dim=1)
        rid = ids.new_tensor(FLUX_CRITIC_ROPE_ID).expand(ids.shape[0], n_c, 3)
        d["txt_ids"] = torch.cat([ids, rid], dim=1)
        return d

    def block_replace(self, index: int, kind: str, previous=None):
        """A ``patches_replace["dit"]`` entry for global block ``index`` (``kind``: double_block / single_block)."""
        cfg = self.critic.config

        def replace(args, extra):
            call = self.call
            if not call.active:
                return previous(args, extra) if previous is not None else extra["original_block"](args)
            call.block = index
            n_c = cfg.n_tokens
            stream = "txt" if kind == "double_block" else "img"
            if index == cfg.l_in:
                from diffusers_ext.critic import core

                t = args[stream]
                args = dict(args)
                args[stream] = core.replace_rows(t, self.critic.token_rows(t.shape[0], t.dtype, t.device), call.n_txt)
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            if index in cfg.l_c:
                if kind == "double_block":
                    h_img, h_c = out["img"][:, :call.n_target], out["txt"][:, call.n_txt:call.n_txt + n_c]
                else:
                    seq = out["img"]
                    start = call.n_txt + n_c
                    h_img, h_c = seq[:, start:start + call.n_target], seq[:, call.n_txt:call.n_txt + n_c]
                call.maps[index] = self.critic.critique(index, h_img, h_c)
            call.block = -1
            return out

        return replace

    def attention_override(self, func, *args, **kwargs):
        """``transformer_options["optimized_attention_override"]``: the block's joint attention through the core."""
        def kernel(*a, **kw):
            if self.previous_override is not None:
                return self.previous_override(func, *a, **kw)
            return func(*a, **kw)

        call = self.call
        if not call.active or call.block < 0:
            return kernel(*args, **kwargs)
        q, k, v, heads = args[:4]
        rest = list(args[4:])
        mask = kwargs.get("mask", rest[0] if rest else None)
        if mask is not None:
            raise EditSteerConfigError("the Inline Critic does not support attention masks inside the transformer "
                                       "(a regional-prompting or attention-mask node is active on this MODEL)")
        skip = bool(kwargs.get("skip_reshape", False))
        if kwargs.get("skip_output_reshape", False):
            raise EditSteerConfigError("the Inline Critic expects the attention output in (batch, seq, heads*dim)")

        def attn_fn(qq, kk, vv, m):
            mm = None if m is None else m[:, None, None, :]
            a = [_from_bshd(qq, skip), _from_bshd(kk, skip), _from_bshd(vv, skip), heads]
            kw = dict(kwargs)
            if rest:
                a.append(mm)
                a.extend(rest[1:])
            else:
                kw["mask"] = mm
            out = kernel(*a, **kw)
            return out.view(out.shape[0], out.shape[1], heads, -1)

        out = self.critic.attention(call.block, _to_bshd(q, heads, skip), _to_bshd(k, heads, skip),
                                    _to_bshd(v, heads, skip), start=call.n_txt, mode=self.mode, scale=self.scale,
                                    attn_fn=attn_fn)
        return out.flatten(2)

    def on_outer_sample(self, executor, *args, **kwargs):
        """``WrappersMP.OUTER_SAMPLE``: a new sampling run starts a new record."""
        self.recorder.reset()
        return executor(*args, **kwargs)


def chains_to(override, target, limit: int = 64) -> bool:
    """Whether the attention override ``override`` is ``target`` or visibly calls it: through the
    ``previous_override`` of the object it is a method of (as :class:`CriticPatch` chains), ``__wrapped__``
    (``functools.wraps``), a ``functools.partial`` or a closure cell."""
    todo, seen = [override], 0
    while todo and seen < limit:
        f = todo.pop()
        seen += 1
        if f is None or not callable(f):
            continue
        if f == target:
            return True
        todo.append(getattr(getattr(f, "__self__", None), "previous_override", None))
        todo.append(getattr(f, "__wrapped__", None))
        if isinstance(f, functools.partial):
            todo.extend([f.func, *f.args, *f.keywords.values()])
        for cell in getattr(f, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    return False


def installed(model_patcher) -> CriticPatch | None:
    """The critic patched onto this MODEL (or a clone of it), if any."""
    for w in model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        owner = getattr(w, "__self__", None)
        if isinstance(owner, CriticPatch):
            return owner
    return None


def apply_critic(model_patcher, critic, mode: str = "steer", scale: float | None = None):
    """A clone of ``model_patcher`` running ``critic`` (an ``InlineCritic``) in ``mode`` with steer ``scale``.

    Every check runs before anything is patched, and only the clone is ever patched: the input MODEL is unchanged
    whatever happens. ``mode="off"`` returns a plain clone (the frozen model, bit for bit).
    """
    if mode not in MODES:
        raise EditSteerConfigError(f"unknown Inline Critic mode {mode!r}; modes are {', '.join(MODES)}")
    scale = critic.config.steer_scale if scale is None else float(scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise EditSteerConfigError(f"critic strength must be a finite number >= 0, got {scale!r}")
    desc = describe_model(model_patcher)
    critic.check_compatible(desc, where="this MODEL")
    if installed(model_patcher) is not None:
        raise EditSteerConfigError("an Inline Critic is already applied to this MODEL; apply the critic to the "
                                   "model without one (one critic per model)")
    m = model_patcher.clone()
    if mode == "off":
        return m, None
    to = m.model_options["transformer_options"]
    patch = CriticPatch(critic, desc, mode, scale, previous_override=to.get("optimized_attention_override"))
    depth = desc["depth"]
    dit = to.get("patches_replace", {}).get("dit", {})
    for i in range(depth):
        if desc["arch"] == "flux" and i >= patch.num_double:
            kind, local = "single_block", i - patch.num_double
        else:
            kind, local = "double_block", i
        m.set_model_patch_replace(patch.block_replace(i, kind, dit.get((kind, local))), "dit", kind, local)
    to = m.model_options["transformer_options"]  # set_model_patch_replace may rebuild the dicts
    to["optimized_attention_override"] = patch.attention_override
    if desc["arch"] == "flux":
        m.set_model_post_input_patch(patch.post_input)
    wp = comfy.patcher_extension.WrappersMP
    m.add_wrapper_with_key(wp.DIFFUSION_MODEL, WRAPPER_KEY, patch.diffusion_model_wrapper)
    m.add_wrapper_with_key(wp.OUTER_SAMPLE, WRAPPER_KEY, patch.on_outer_sample)
    logger.info("EditSteer: Inline Critic (%s, l_in %d, l_c %s) applied to a %s in %s mode, strength %g",
                critic.config.arch, critic.config.l_in, list(critic.config.l_c), desc["class"], mode, scale)
    return m, patch

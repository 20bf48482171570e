"""Loading Switti checkpoints: the official Hub layout and this pack's diffusers layout, local first.

Official layout (``PyTorchModelHubMixin``, as ``SwittiHF`` / ``VQVAEHF`` push them): a repo with ``config.json``
holding the class's init arguments (``{"depth": 30, "rope": true, ...}``; ``reso`` picks the scale schedule) and
``model.safetensors`` with the official parameter names. This pack's ports use the same names, so loading is a
config translation plus a strict ``load_state_dict`` (derived buffers aside).

Where a source is found (:func:`locate`): an explicit folder; a weight-manifest id (``switti-512``, ``switti-1024``,
``vqvae-switti``, via :func:`diffusers_ext.weights.resolve`: ComfyUI/EDITSTEER_WEIGHTS_DIR folders, the Hugging Face
cache, then the Hub only when downloads are allowed); or any Hub repo id (HF cache, Hub only when allowed). Wrong
model families fail with :class:`~diffusers_ext.errors.ModelFamilyError`; missing weights with
:class:`~diffusers_ext.errors.WeightsError`.

Example::

    from diffusers_ext.switti.loading import load_transformer, load_vqvae
    transformer = load_transformer("yresearch/Switti")            # HF cache (or Hub with EDITSTEER_ALLOW_DOWNLOAD=1)
    vqvae = load_vqvae("yresearch/VQVAE-Switti", reso=512)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch

from ..errors import EditSteerConfigError, ModelFamilyError, WeightsError
from ..weights import downloads_allowed, load_safetensors, resolve, save_safetensors
from ..weights.manifest import get_artifact, load_manifest
from .schedules import RESOLUTION_PATCH_NUMS, patch_nums_for_resolution
from .transformer import SwittiTransformer
from .vqvae import SwittiVQVAE

logger = logging.getLogger(__name__)

OFFICIAL_WEIGHTS_NAME = "model.safetensors"
OFFICIAL_CONFIG_NAME = "config.json"
TEXT_ENCODER_REPO = "openai/clip-vit-large-patch14"
TEXT_ENCODER_2_REPO = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

# SwittiHF / VQVAEHF init arguments and their defaults (the official classes' signatures).
_SWITTI_HF_DEFAULTS = {"depth": 30, "rope": True, "rope_theta": 10000, "rope_size": 128, "use_swiglu_ffn": True,
                       "use_ar": False, "use_crop_cond": True, "reso": 512}
_VQVAE_HF_DEFAULTS = {"vocab_size": 4096, "z_channels": 32, "ch": 160, "test_mode": True, "share_quant_resi": 4,
                      "reso": 1024}
# Parameters any Switti transformer / VQ-VAE state dict has (used to recognise other model families).
_SWITTI_MARKERS = ("word_embed.weight", "text_pooler.weight", "lvl_embed.weight", "blocks.0.cross_attn.to_kv.weight",
                   "head.weight")
_VQVAE_MARKERS = ("quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight", "encoder.conv_in.weight",
                  "decoder.conv_out.weight")


def resolve_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype``, or the deprecated ``torch_dtype`` alias with a ``FutureWarning`` (diffusers >= 0.42 and
    transformers >= 4.56 renamed the argument the same way; diffusers 1.0 drops the old name)."""
    if torch_dtype is None:
        return dtype
    if dtype is not None:
        raise EditSteerConfigError("pass dtype= only; torch_dtype= is its deprecated alias")
    warnings.warn("torch_dtype= is deprecated, use dtype= (as diffusers and transformers now do)", FutureWarning,
                  stacklevel=3)
    return torch_dtype


# ----------------------------------------------------------------------------------------------------------------
# where


def _artifact_for_repo(repo_id: str) -> str | None:
    for art in load_manifest().values():
        if art.repo_id == repo_id and art.is_folder:
            return art.id
    return None


def locate(source: str | os.PathLike, *, allow_download: bool | None = None) -> Path:
    """The local folder holding a checkpoint given as a folder, a manifest id, or a Hub repo id."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    s = str(source)
    try:
        art = get_artifact(s)
    except EditSteerConfigError:
        art = None
    if art is None and "/" in s:
        aid = _artifact_for_repo(s)
        art = get_artifact(aid) if aid else None
    if art is not None:
        return resolve(art, allow_download=allow_download).path
    if "/" not in s or s.count("/") != 1 or p.exists():
        raise WeightsError("not a folder, a weight-manifest id or a Hub repo id", artifact_id=s,
                           hint="pass the folder holding config.json and the weights, or a repo id 'org/name'")
    from huggingface_hub import snapshot_download

    allow = downloads_allowed(allow_download)
    try:
        return Path(snapshot_download(s, local_files_only=not allow,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "**/*.json",
                                                      "**/*.safetensors", "**/*.txt"]))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors
        raise WeightsError(f"repo not found locally{'' if allow else ' (downloads not allowed)'}: {e}",
                           artifact_id=s, repo_id=s,
                           hint="set EDITSTEER_ALLOW_DOWNLOAD=1 (and unset HF_HUB_OFFLINE) to download it, or pass "
                                "a local folder") from None


def _read_config(folder: Path) -> dict:
    f = folder / OFFICIAL_CONFIG_NAME
    if not f.is_file():
        raise ModelFamilyError(f"{folder} has no config.json: not a Switti checkpoint folder (expected config.json + "
                               f"{OFFICIAL_WEIGHTS_NAME}, or a diffusers model folder)")
    return json.loads(f.read_text())


def _check_family(state: dict, markers, what: str, where) -> None:
    missing = [k for k in markers if k not in state]
    if missing:
        some = ", ".join(list(state)[:4])
        raise ModelFamilyError(f"{where} is not a {what} checkpoint: it lacks {', '.join(missing[:3])} "
                               f"(its first entries: {some})")


def _load_strict(model: torch.nn.Module, state: dict, where, ignore: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and k not in ignore]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if unexpected or missing or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatches (file vs model): {'; '.join(wrong[:3])}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}")
        raise ModelFamilyError(f"{where} does not fit the configured model ({'; '.join(parts)}); "
                               "is it the checkpoint its config.json describes?")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# transformer


def transformer_config_from_official(cfg: dict) -> dict:
    """SwittiHF's init arguments -> :class:`SwittiTransformer` config (width = 64 x depth, one head per block)."""
    known = set(_SWITTI_HF_DEFAULTS)
    extra = set(cfg) - known - {"_class_name", "_name_or_path"}
    if extra:
        logger.info("Switti config: ignoring keys %s", sorted(extra))
    c = {**_SWITTI_HF_DEFAULTS, **{k: v for k, v in cfg.items() if k in known}}
    depth = int(c["depth"])
    return dict(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums_for_resolution(c["reso"]),
                rope=bool(c["rope"]), rope_theta=c["rope_theta"], rope_size=c["rope_size"],
                use_swiglu_ffn=bool(c["use_swiglu_ffn"]), use_ar=bool(c["use_ar"]),
                use_crop_cond=bool(c["use_crop_cond"]))


def is_official_config(cfg: dict) -> bool:
    return "_class_name" not in cfg and "depth" in cfg and "embed_dim" not in cfg


def load_transformer(source: str | os.PathLike = "yresearch/Switti", *, dtype: torch.dtype | None = None,
                     allow_download: bool | None = None, torch_dtype: torch.dtype | None = None) -> SwittiTransformer:
    """A :class:`SwittiTransformer` from an official-layout or diffusers-layout checkpoint (see module docstring)."""
    dtype = resolve_dtype(dtype, torch_dtype)
    folder = locate(source, allow_download=allow_download)
    cfg = _read_config(folder)
    if not is_official_config(cfg):
        name = cfg.get("_class_name")
        if name != SwittiTransformer.__name__:
            raise ModelFamilyError(f"{folder} holds a {name or 'unknown'} model, not a Switti transformer "
                                   "(expected SwittiHF's config.json or a SwittiTransformer folder)")
        model = SwittiTransformer.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        return model.eval()
    weights = folder / OFFICIAL_WEIGHTS_NAME
    if not weights.is_file():
        raise WeightsError(f"{OFFICIAL_WEIGHTS_NAME} is missing", artifact_id=str(source), filename=str(weights),
                           hint="the official Switti repos ship model.safetensors; pickle checkpoints are not loaded")
    state = load_safetensors(weights)
    _check_family(state, _SWITTI_MARKERS, "Switti transformer", weights)
    model = SwittiTransformer(**transformer_config_from_official(cfg))
    _load_strict(model, state, weights, ignore=("attn_bias_for_masking",))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def official_transformer_config(model: SwittiTransformer) -> dict:
    """The SwittiHF config.json of a model, when SwittiHF can express it (else EditSteerConfigError)."""
    c = model.config
    reso = next((r for r, p in RESOLUTION_PATCH_NUMS.items() if tuple(p) == tuple(c.patch_nums)), None)
    fixed = dict(embed_dim=64 * c.depth, num_heads=c.depth, V=4096, Cvae=32, context_dim=2048, pooled_embed_size=1280,
                 mlp_ratio=4.0, attn_l2_norm=True, crop_base_size=512)
    bad = [k for k, v in fixed.items() if getattr(c, k) != v]
    if reso is None or bad:
        raise EditSteerConfigError(f"this transformer cannot be written in SwittiHF's layout (differs in "
                                   f"{bad or ['patch_nums']}); use save_pretrained for the diffusers layout")
    return {"depth": c.depth, "rope": c.rope, "rope_theta": c.rope_theta, "rope_size": c.rope_size,
            "use_swiglu_ffn": c.use_swiglu_ffn, "use_ar": c.use_ar, "use_crop_cond": c.use_crop_cond, "reso": reso}


def save_official_transformer(model: SwittiTransformer, folder: str | os.PathLike,
                              include_training_mask: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` as SwittiHF would push them (for tests and exports)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OFFICIAL_CONFIG_NAME).write_text(json.dumps(official_transformer_config(model), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if include_training_mask:
        state["attn_bias_for_masking"] = model.attn_bias_for_masking()
    save_safetensors(state, folder / OFFICIAL_WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


# ----------------------------------------------------------------------------------------------------------------
# VQ-VAE


def vqvae_config_from_official(cfg: dict, reso: int | None = None) -> dict:
    c = {**_VQVAE_HF_DEFAULTS, **{k: v for k, v in cfg.items() if k in _VQVAE_HF_DEFAULTS}}
    return dict(vocab_size=int(c["vocab_size"]), z_channels=int(c["z_channels"]), ch=int(c["ch"]),
                share_quant_resi=int(c["share_quant_resi"]),
                v_patch_nums=patch_nums_for_resolution(reso if reso is not None else c["reso"]))


def load_vqvae(source: str | os.PathLike = "yresearch/VQVAE-Switti", *, reso: int | None = None,
               dtype: torch.dtype | None = None, allow_download: bool | None = None,
               torch_dtype: torch.dtype | None = None) -> SwittiVQVAE:
    """A :class:`SwittiVQVAE`; ``reso`` picks the schedule of an official checkpoint (as ``VQVAEHF(reso=...)``)."""
    dtype = resolve_dtype(dtype, torch_dtype)
    folder = locate(source, allow_download=allow_download)
    cfg = _read_config(folder)
    if "_class_name" in cfg:
        if cfg["_class_name"] != SwittiVQVAE.__name__:
            raise ModelFamilyError(f"{folder} holds a {cfg['_class_name']} model, not Switti's VQ-VAE")
        return SwittiVQVAE.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    weights = folder / OFFICIAL_WEIGHTS_NAME
    if not weights.is_file():
        raise WeightsError(f"{OFFICIAL_WEIGHTS_NAME} is missing", artifact_id=str(source), filename=str(weights))
    state = load_safetensors(weights)
    _check_family(state, _VQVAE_MARKERS, "Switti VQ-VAE", weights)
    model = SwittiVQVAE(**vqvae_config_from_official(cfg, reso))
    key = "quantize.ema_vocab_hit_SV"  # training statistics sized by the saving schedule: keep ours
    if key in state:
        state[key] = model.quantize.ema_vocab_hit_SV.clone()
    _load_strict(model, state, weights)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_official_vqvae(model: SwittiVQVAE, folder: str | os.PathLike) -> Path:
    c = model.config
    if (tuple(c.ch_mult), c.num_res_blocks, c.using_sa, c.using_mid_sa, c.norm_num_groups) != ((1, 1, 2, 2, 4), 2, True,
                                                                                              True, 32):
        raise EditSteerConfigError("this VQ-VAE's architecture cannot be written in VQVAEHF's layout")
    reso = next((r for r, p in RESOLUTION_PATCH_NUMS.items() if tuple(p) == tuple(c.v_patch_nums)), 1024)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"vocab_size": c.vocab_size, "z_channels": c.z_channels, "ch": c.ch, "test_mode": True,
           "share_quant_resi": c.share_quant_resi, "reso": reso}
    (folder / OFFICIAL_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                     folder / OFFICIAL_WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


# ----------------------------------------------------------------------------------------------------------------
# text encoders


def load_text_encoders(text_encoder: str | os.PathLike = TEXT_ENCODER_REPO,
                       text_encoder_2: str | os.PathLike = TEXT_ENCODER_2_REPO, *,
                       dtype: torch.dtype | None = None, allow_download: bool | None = None,
                       torch_dtype: torch.dtype | None = None):
    """``(tokenizer, CLIPTextModel, tokenizer_2, CLIPTextModel)`` from folders or Hub repos (safetensors only)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = resolve_dtype(dtype, torch_dtype)
    allow = downloads_allowed(allow_download)
    out = []
    for src in (text_encoder, text_encoder_2):
        try:
            tok = CLIPTokenizer.from_pretrained(src, local_files_only=not allow)
            model, info = CLIPTextModel.from_pretrained(src, local_files_only=not allow, use_safetensors=True,
                                                        dtype=dtype, output_loading_info=True)
        except OSError as e:
            raise WeightsError(f"CLIP text encoder not found{'' if allow else ' locally (downloads not allowed)'}: "
                               f"{str(e).splitlines()[0]}", artifact_id=str(src), repo_id=str(src),
                               hint="set EDITSTEER_ALLOW_DOWNLOAD=1 (and unset HF_HUB_OFFLINE) to download it, or "
                                    "pass a local folder") from None
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers only warns, and the encoder would run with random weights
            raise WeightsError(
                f"CLIP text encoder {src}: {len(missing)} of {len(model.state_dict())} weights are not in the "
                f"checkpoint (e.g. {missing[0]}); transformers would initialise them at random",
                artifact_id=str(src), repo_id=str(src),
                hint="a CLIPTextModel saved by transformers >= 5.6 lacks the Hub's 'text_model.' key prefix, which "
                     "transformers 5.0-5.5 need: upgrade transformers, or rewrite the folder with "
                     "diffusers_ext.weights.hub_key_layout(folder)")
        out += [tok, model.eval()]
    return tuple(out)

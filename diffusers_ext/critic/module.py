"""The Inline Critic module: learnable critic tokens, critique heads, optional per-block adapters; Hub-ready I/O.

The module holds every trainable tensor of a critic and the per-call computations that involve them (resetting the
critic rows, the block's critic attention, the critique head), so that the diffusers adapter and the ComfyUI adapter
make the same predictions from one weight file. It never holds a backbone weight.

Files: a critic folder (local, Hub repo, or bundled artifact) holds ``critic.safetensors`` (tensors + metadata
carrying the full config) and ``config.json`` (the same config, for the Hub). A lone ``critic.safetensors`` is
enough to load a critic.

Example::

    from diffusers_ext.critic import CriticConfig, InlineCritic
    critic = InlineCritic(CriticConfig(arch="flux", width=32, depth=2, num_heads=2, num_double=1, l_in=0))
    critic.save_pretrained("my-critic")                   # critic.safetensors + config.json (+ README.md)
    same = InlineCritic.from_pretrained("my-critic")      # also: a manifest id, a .safetensors file, a Hub repo id
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin

from ..errors import EditSteerConfigError, ModelFamilyError, WeightsError
from . import core
from .config import CriticConfig, check_mode

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "critic.safetensors"
CONFIG_NAME = "config.json"


class CritiqueHead(nn.Module):
    """``e_i = w_o . gelu(W_h LN(h_i) + W_c LN(c)) + b_o``: the critic's prediction of the log-normalised error of
    image token ``i`` from the image hidden state ``h_i`` and the critic's own hidden state(s) ``c`` at one block.
    Computed in float32 whatever the backbone dtype."""

    def __init__(self, width: int, n_tokens: int, hidden: int):
        super().__init__()
        self.width = width
        self.in_h = nn.Linear(width, hidden)
        self.in_c = nn.Linear(width * n_tokens, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, 1.0)  # log-normalised error maps have mean 1

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``h (B, N, W)``, ``c (B, n_c, W)`` -> ``(B, N)`` float32."""
        u = F.layer_norm(h.float(), (self.width,), eps=1e-6)
        z = F.layer_norm(c.float(), (self.width,), eps=1e-6).flatten(1)
        a = self.in_h(u) + self.in_c(z)[:, None, :]
        return self.out(F.gelu(a)).squeeze(-1)


class CriticAdapter(nn.Module):
    """One block's adapter on the critic rows of q, k, v: a low-rank residual plus a per-token offset
    (``core.lowrank_residual``); starts as the identity."""

    def __init__(self, width: int, rank: int, n_tokens: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(3, width, rank) / math.sqrt(width))
        self.up = nn.Parameter(torch.zeros(3, rank, width))
        self.bias = nn.Parameter(torch.zeros(3, n_tokens, width))

    def pair(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.down, self.up, self.bias


class SteerAdapter(nn.Module):
    """One steering block's low-rank corrections of the image rows of q, k, v (post-RoPE) and of the attention
    output (``core.steer_rows``), their bottleneck scaled per sample by the critic's value rows
    (``core.critic_film``) when ``conditioned``. ``up`` and ``film`` start at zero: a new adapter is the identity."""

    def __init__(self, width: int, rank: int, n_tokens: int, conditioned: bool = True):
        super().__init__()
        self.down = nn.Parameter(torch.randn(4, width, rank) / math.sqrt(width))
        self.up = nn.Parameter(torch.zeros(4, rank, width))
        self.film = nn.Parameter(torch.zeros(4, n_tokens * width, rank)) if conditioned else None

    def pair(self) -> tuple[torch.Tensor, ...]:
        return (self.down, self.up) if self.film is None else (self.down, self.up, self.film)


class InlineCritic(nn.Module, ModelHubMixin, library_name="editsteer", tags=["inline-critic", "image-editing"],
                   repo_url="https://github.com/editsteer/editsteer"):
    """Critic tokens + critique heads (+ optional per-block critic adapters) for one backbone.

    Parameters (state-dict keys): ``tokens (n_c, width)``; ``heads.<l_c>.*`` (one :class:`CritiqueHead` per
    critique block); ``adapters.<block>.down (3, width, r)`` / ``.up (3, r, width)`` / ``.bias (3, n_c, width)`` for every
    block from ``l_in`` when ``adapter_rank > 0``; ``gates.<block> (num_heads,)`` for every steering block when
    ``steer_attention == "decoupled"``; ``steer_adapters.<block>.down (4, width, r)`` / ``.up (4, r, width)`` /
    ``.film (4, n_c*width, r)`` (:class:`SteerAdapter`) for every steering block when ``steer_rank > 0``. Keep them
    in float32; they are cast to the activations' dtype where they meet them.
    """

    def __init__(self, config: CriticConfig):
        super().__init__()
        if isinstance(config, dict):
            config = CriticConfig.from_dict(config)
        self.config = config
        w = config.width
        self.tokens = nn.Parameter(torch.randn(config.n_tokens, w) * 0.02)
        self.heads = nn.ModuleDict({str(l): CritiqueHead(w, config.n_tokens, config.head_hidden) for l in config.l_c})
        self.adapters = nn.ModuleDict({str(b): CriticAdapter(w, config.adapter_rank, config.n_tokens)
                                       for b in config.adapter_blocks()})
        self.gates = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(config.num_heads))
                                       for b in config.gate_blocks()})
        self.steer_adapters = nn.ModuleDict({
            str(b): SteerAdapter(w, config.steer_rank, config.n_tokens, config.steer_conditioned)
            for b in config.steer_adapter_blocks()})

    # -- per-call computations (shared with the ComfyUI adapter) ------------------------------------------------
    def token_rows(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The critic rows written into the text stream at the input of block ``l_in``: ``(batch, n_c, width)``."""
        return self.tokens.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, -1, -1)

    def block_mode(self, block: int, mode: str | None = None) -> str:
        return self.config.block_mode(block, mode)

    def adapter_for(self, block: int):
        a = self.adapters[str(block)] if str(block) in self.adapters else None
        return None if a is None else a.pair()

    def gate_for(self, block: int) -> torch.Tensor | None:
        return self.gates[str(block)] if str(block) in self.gates else None

    def steer_adapter_for(self, block: int):
        a = self.steer_adapters[str(block)] if str(block) in self.steer_adapters else None
        return None if a is None else a.pair()

    def attention(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int,
                  mode: str | None = None, scale: float | None = None, key_mask: torch.Tensor | None = None,
                  attn_fn: core.AttnFn = core.sdpa_bshd) -> torch.Tensor:
        """Block ``block``'s attention over the joint ``BSHD`` sequence with the critic rows at
        ``[start, start + n_c)`` (see :mod:`diffusers_ext.critic.core`)."""
        return core.critic_attention(
            q, k, v, start=start, n_c=self.config.n_tokens, block_mode=self.block_mode(block, mode),
            scale=self.config.steer_scale if scale is None else scale, key_mask=key_mask,
            adapter=self.adapter_for(block), gate=self.gate_for(block),
            steer_adapter=self.steer_adapter_for(block), attn_fn=attn_fn)

    def critique(self, block: int, h_img: torch.Tensor, h_critic: torch.Tensor) -> torch.Tensor:
        """Predicted log-normalised error per image token, read after block ``block``: ``(B, N)`` float32.

        ``h_img (B, N, W)``: image-stream hidden states of the *target* tokens (condition tokens dropped);
        ``h_critic (B, n_c, W)``: the critic rows of the text stream, both at the output of the block."""
        return self.heads[str(block)](h_img, h_critic)

    # -- compatibility ------------------------------------------------------------------------------------------
    def check_compatible(self, desc: dict, where: str = "the transformer") -> None:
        """Raise :class:`ModelFamilyError` unless this critic was built for a backbone like ``desc`` (a dict from
        :func:`diffusers_ext.critic.apply.describe_transformer`)."""
        c = self.config
        if desc["arch"] != c.arch:
            raise ModelFamilyError(
                f"this Inline Critic was trained for the '{c.arch}' family (base model {c.base_model or '?'}) but "
                f"{where} is a '{desc['arch']}' model ({desc['class']}); use a critic trained for that family")
        for key in ("width", "num_heads", "depth", "num_double", "context_dim"):
            want, got = getattr(c, key), desc.get(key)
            if want is not None and got is not None and want != got:
                raise ModelFamilyError(
                    f"this Inline Critic was trained for a {c.arch} backbone with {key}={want} (base model "
                    f"{c.base_model or '?'}) but {where} has {key}={got}; use a critic trained for this model size")

    # -- save / load --------------------------------------------------------------------------------------------
    def save_weights(self, path: str | os.PathLike) -> Path:
        """Write ``critic.safetensors`` (float32 tensors + metadata with the full config)."""
        from ..weights import save_safetensors

        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        return save_safetensors(sd, path, metadata=self.config.metadata())

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        self.save_weights(save_directory / WEIGHTS_NAME)
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    def save_pretrained(self, save_directory, **kwargs):  # config.json is written by _save_pretrained
        return super().save_pretrained(save_directory, config=self.config.to_dict(), **kwargs)

    @classmethod
    def load_file(cls, path: str | os.PathLike, *, artifact_id: str = "<file>") -> "InlineCritic":
        """Load a critic from one ``critic.safetensors`` (config from its metadata); strict key check."""
        from ..weights import load_safetensors, read_safetensors_metadata

        path = Path(path)
        meta = read_safetensors_metadata(path, artifact_id=artifact_id)
        config = CriticConfig.from_metadata(meta, source=str(path))
        critic = cls(config)
        sd = load_safetensors(path, artifact_id=artifact_id)
        missing, unexpected = critic.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelFamilyError(f"{path} does not match its own config: missing tensors {missing}, unexpected "
                                   f"tensors {unexpected}")
        return critic.eval()

    @classmethod
    def from_pretrained(cls, pretrained: "str | os.PathLike | InlineCritic", *, revision: str | None = None,
                        local_files_only: bool | None = None, allow_download: bool | None = None,
                        cache_dir=None, token=None, **_ignored) -> "InlineCritic":
        """Load a critic from, in this order: an :class:`InlineCritic` (returned as is), a ``.safetensors`` file,
        a local folder, an id of ``weights_manifest/`` (resolved local-first and sha256-verified), or a Hub repo
        id (``critic.safetensors`` at ``revision``: from the Hugging Face cache, downloaded only when
        ``allow_download=True`` or ``EDITSTEER_ALLOW_DOWNLOAD=1``, as every download of the pack).

        Example::

            critic = InlineCritic.from_pretrained("toy-critic")        # bundled, verified
        """
        if isinstance(pretrained, InlineCritic):
            return pretrained
        p = Path(str(pretrained)).expanduser()
        if p.is_file():
            return cls.load_file(p)
        if p.is_dir():
            f = p / WEIGHTS_NAME
            if not f.is_file():
                raise WeightsError("the folder has no critic weights", artifact_id=str(p), filename=WEIGHTS_NAME,
                                   hint=f"a critic folder holds {WEIGHTS_NAME} (written by InlineCritic."
                                        "save_pretrained or `editsteer train critic`)")
            return cls.load_file(f)
        name = str(pretrained)
        from ..weights import get_artifact, load_manifest, resolve

        if name in load_manifest():
            found = resolve(get_artifact(name), allow_download=allow_download)
            f = found.path / WEIGHTS_NAME if found.path.is_dir() else found.path
            return cls.load_file(f, artifact_id=name)
        if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
            raise WeightsError("no such file or folder", artifact_id=name,
                               hint="pass an existing critic folder or critic.safetensors file")
        if name.count("/") != 1:
            raise WeightsError("not a file, a folder, a manifest id or a Hub repo id", artifact_id=name,
                               hint="pass a critic folder, a critic.safetensors file, an id listed by "
                                    "`editsteer weights list`, or a Hub repo id 'org/name'")
        from huggingface_hub import hf_hub_download

        from ..weights.resolver import downloads_allowed

        try:  # the Hugging Face cache always; the Hub only when downloads are allowed (and not offline)
            f = hf_hub_download(name, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir, token=token,
                                local_files_only=bool(local_files_only) or not downloads_allowed(allow_download))
        except Exception as e:  # offline, missing repo/file, auth
            off = "" if downloads_allowed(allow_download) else (
                "downloads are off (pass allow_download=True or set EDITSTEER_ALLOW_DOWNLOAD=1, with HF_HUB_OFFLINE "
                "unset), so only the Hugging Face cache was searched; ")
            raise WeightsError(f"could not get {WEIGHTS_NAME} from the Hub repo ({type(e).__name__}: {e})",
                               artifact_id=name, repo_id=name, filename=WEIGHTS_NAME,
                               hint=off + "check the repo id and revision; offline, put the files in the Hugging "
                                          "Face cache or pass a local folder") from None
        return cls.load_file(f, artifact_id=name)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, **model_kwargs):  # ModelHubMixin protocol
        return cls.from_pretrained(model_id, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only, token=token)

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c.arch}, width={c.width}, n_c={c.n_tokens}, l_in={c.l_in}, l_c={list(c.l_c)}, "
                f"mode={c.mode}, adapter_rank={c.adapter_rank}, steer_rank={c.steer_rank}, "
                f"steer_attention={c.steer_attention}, stage={c.stage}")


# -- probes (stage 1 and the probe diagnostic) ---------------------------------------------------------------------
class ProbeHead(nn.Module):
    """``P_l(h, temb) = proj(AdaLN(h; temb)) + MLP(AdaLN(h; temb))``: a per-layer velocity probe.

    Initialised from the backbone's own ``norm_out`` / ``proj_out`` (the "logit lens"), with a zero-initialised MLP
    branch, so an untrained probe reads out exactly what the final layer would."""

    def __init__(self, width: int, out_dim: int, hidden: int = 64):
        super().__init__()
        self.width = width
        self.ada = nn.Linear(width, 2 * width)  # temb -> (scale, shift), like AdaLayerNormContinuous
        self.proj = nn.Linear(width, out_dim)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    @torch.no_grad()
    def init_from(self, norm_out: nn.Module, proj_out: nn.Linear) -> None:
        self.ada.load_state_dict({k: v.float() for k, v in norm_out.linear.state_dict().items()})
        self.proj.load_state_dict({k: v.float() for k, v in proj_out.state_dict().items()})

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada(F.silu(temb.float())).chunk(2, dim=-1)
        x = F.layer_norm(h.float(), (self.width,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return self.proj(x) + self.mlp(x)


class ProbeHeads(nn.Module):
    """One :class:`ProbeHead` per block (``heads.<block>``), trained in stage 1 (``methods.md`` §1.4)."""

    def __init__(self, width: int, out_dim: int, blocks, hidden: int = 64, arch: str = "", base_model: str = ""):
        super().__init__()
        self.meta = {"arch": arch, "base_model": base_model, "width": width, "out_dim": out_dim, "hidden": hidden,
                     "blocks": [int(b) for b in blocks]}
        self.heads = nn.ModuleDict({str(b): ProbeHead(width, out_dim, hidden) for b in blocks})

    def init_from(self, transformer) -> "ProbeHeads":
        for h in self.heads.values():
            h.init_from(transformer.norm_out, transformer.proj_out)
        return self

    def forward(self, block: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.heads[str(block)](h, temb)

    def save(self, path) -> Path:
        from ..weights import save_safetensors

        sd = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        return save_safetensors(sd, path, metadata={"format": "pt", "editsteer_kind": "critic-probes",
                                                    "probes": json.dumps(self.meta)})

    @classmethod
    def load(cls, path) -> "ProbeHeads":
        from ..weights import load_safetensors, read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if meta.get("editsteer_kind") != "critic-probes":
            raise EditSteerConfigError(f"{path} is not a probe-heads file (written by `editsteer train critic` "
                                       "stage 1)")
        m = json.loads(meta["probes"])
        heads = cls(m["width"], m["out_dim"], m["blocks"], m["hidden"], m.get("arch", ""), m.get("base_model", ""))
        heads.load_state_dict(load_safetensors(path))
        return heads.eval()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CriticAdapter", "CritiqueHead", "InlineCritic", "ProbeHead",
           "ProbeHeads", "SteerAdapter", "check_mode"]

"""The Inline Critic's validated configuration.

A :class:`CriticConfig` describes one critic: which backbone it was built for (family, width, depth, heads), how
many critic tokens it has, where they enter (``l_in``), where the critique head reads (``l_c``), which stream carries
them, and the default run mode. It is stored with the weights (``config.json`` and the safetensors metadata) and
validated against the transformer it is applied to.

Example::

    from diffusers_ext.critic import CriticConfig
    cfg = CriticConfig(arch="flux", width=3072, depth=57, num_heads=24, num_double=19, l_in=8, l_c=(18,))
    cfg.block_mode(3), cfg.block_mode(8), cfg.block_mode(20)    # ('dormant', 'read', 'steer')
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..errors import EditSteerConfigError, ModelFamilyError

logger = logging.getLogger(__name__)

#: Run modes. ``off``: the frozen model, bit for bit (no token is appended). ``critique``: the stage-2 masked mode
#: (the critic reads every token, no token attends to it; the model output is unchanged and the error map is
#: produced). ``steer``: the stage-3 mode (image and text tokens of the blocks from ``steer_start`` on attend to it).
MODES = ("off", "critique", "steer")
#: Streams that can carry the critic tokens. Only the text stream is implemented: its rows are carried by Flux's
#: single-stream blocks automatically and ComfyUI can reproduce it with its own patch points.
STREAMS = ("text",)
ARCHS = ("flux", "qwen-image")
#: How ``steer`` blocks attend to the critic. ``joint``: the critic keys join the frozen attention's softmax (one
#: attention call over the joint sequence). ``decoupled``: the frozen attention runs as in ``critique`` mode and
#: every token adds a separate attention over the critic keys alone, scaled by a learned per-head gate that starts
#: at zero (IP-Adapter's decoupled cross-attention; EditSteer's proposed design).
STEER_ATTENTION = ("joint", "decoupled")
#: Flux RoPE id given to every critic token: axis 0 = 3 is used neither by text (0), nor by the target (0), nor by
#: Kontext references (1). ComfyUI's ``ref_latents_method="index"`` numbers references 1, 2, 3, ...: a third
#: reference would share it, and both adapters refuse image ids with axis 0 = 3 (fixed by the trained critics).
FLUX_CRITIC_ROPE_ID = (3, 0, 0)
PLACEMENT = {
    "flux": "text stream: n_c rows appended to encoder_hidden_states (conditioning space, zeros) before "
            "context_embedder, RoPE id (3,0,0); rows set to the learned tokens at the input of block l_in",
    "qwen-image": "text stream: n_c rows appended to encoder_hidden_states (conditioning space, zeros) before "
                  "txt_norm/txt_in, mask 1, RoPE positions right after the sample's own unpadded prompt (whatever "
                  "the batch padding); rows set to the learned tokens at the input of block l_in",
}
#: Placements of earlier files that still load, with a warning: arch -> (placement as stored, what changed).
LEGACY_PLACEMENT = {
    "qwen-image": (
        ("text stream: n_c rows appended to encoder_hidden_states (conditioning space, zeros) before txt_norm/txt_in, "
         "mask 1, next text RoPE positions; rows set to the learned tokens at the input of block l_in"),
        ("its critic rows took the RoPE positions after the *padded* text, so in a padded batch a sample's critic "
         "depended on its neighbours' prompt lengths; they now sit right after each sample's own prompt, which is "
         "the same position for every unpadded prompt (ComfyUI, one prompt per call) and differs only for padded "
         "prompts in diffusers batches")),
}
#: Version of the weight-file layout; bumped when the meaning of a stored tensor changes.
PACK_VERSION = "1"


def _as_layers(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (int(v),)
    return tuple(int(x) for x in v)


@dataclass
class CriticConfig:
    """Configuration of an Inline Critic (``methods.md`` §1.4).

    Block indices are global: Flux counts its double-stream blocks first (``0 .. num_double-1``) then its
    single-stream blocks; Qwen-Image has ``depth`` double-stream blocks.

    Args:
        arch: backbone family, ``"flux"`` (FLUX.1 Kontext / ``FluxTransformer2DModel``) or ``"qwen-image"``.
        width: hidden size of the backbone (``inner_dim``), 3072 for both full-size models.
        depth: number of transformer blocks (Flux: double + single).
        num_heads: attention heads of the backbone.
        num_double: Flux only: number of double-stream blocks (19 for FLUX.1).
        context_dim: width of the conditioning text embeddings the critic rows are appended to (Flux
            ``joint_attention_dim``; Qwen ``joint_attention_dim``).
        n_tokens: number of critic tokens ``n_c``.
        l_in: block at whose input the critic rows are set to the learned tokens; from there on the critic reads.
        l_c: blocks after which the critique head reads (each ``>= l_in``); the error map is their mean.
        stream: stream carrying the tokens (``"text"``).
        mode: default run mode (``off`` / ``critique`` / ``steer``).
        steer_start: first block whose tokens attend to the critic in ``steer`` mode (default ``l_in + 1``).
        steer_scale: strength of the steering in ``steer`` mode, applied to every part of it: it multiplies the
            critic's attention weight in ``joint`` steering (a logit bias ``log(scale)`` on the critic keys) and the
            per-head gates of ``decoupled`` steering, and scales the steering adapters' corrections linearly. 0
            reproduces ``critique`` mode, 1 is as trained. The critic's own q/k/v adapters are not scaled.
        head_hidden: hidden width of the critique head MLP.
        adapter_rank: rank of the per-block low-rank adapters on the critic rows' q/k/v (0 = none, the plain token).
        steer_attention: ``"joint"`` or ``"decoupled"`` (see :data:`STEER_ATTENTION`); ``decoupled`` adds one
            learned gate per head to every steering block.
        steer_rank: rank of the steering adapters (0 = none): in every steering block, low-rank corrections of the
            image rows' q, k, v and attention output, active in ``steer`` mode only, scaled by the steer scale.
        steer_conditioned: whether the steering adapters' bottleneck is scaled by the critic's state at that block
            (``False``: plain adapters, the ablation that tells what the critic adds to them).
        base_model: the checkpoint the critic was trained against (an id or Hub repo), informative.
        stage: training stage that produced the weights (0 untrained, 2 masked critic, 3 unmasked joint).
    """

    arch: str
    width: int
    depth: int
    num_heads: int
    num_double: int | None = None
    context_dim: int | None = None
    n_tokens: int = 1
    l_in: int = 0
    l_c: tuple[int, ...] = ()
    stream: str = "text"
    mode: str = "critique"
    steer_start: int | None = None
    steer_scale: float = 1.0
    head_hidden: int = 64
    adapter_rank: int = 0
    steer_attention: str = "joint"
    steer_rank: int = 0
    steer_conditioned: bool = True
    base_model: str = ""
    stage: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.l_c = _as_layers(self.l_c)
        if not self.l_c:
            self.l_c = (min(self.depth - 1, self.l_in + max(1, (self.depth - self.l_in) // 3)),) if self.depth else ()
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg):
            raise EditSteerConfigError(f"CriticConfig: {msg}")

        if self.arch not in ARCHS:
            bad(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("width", "depth", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.width % self.num_heads:
            bad(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.arch == "flux":
            if self.num_double is None or not 0 <= self.num_double <= self.depth:
                bad(f"num_double (Flux double-stream blocks) must be in [0, depth={self.depth}], "
                    f"got {self.num_double!r}")
        if not isinstance(self.n_tokens, int) or self.n_tokens < 1:
            bad(f"n_tokens must be a positive integer, got {self.n_tokens!r}")
        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}; modes are {', '.join(MODES)}")
        if self.stream not in STREAMS:
            bad(f"stream {self.stream!r} is not implemented; streams are {', '.join(STREAMS)}")
        self.check_layer(self.l_in, "l_in")
        for lc in self.l_c:
            self.check_layer(lc, "l_c")
            if lc < self.l_in:
                bad(f"critique layer l_c={lc} is before the insertion layer l_in={self.l_in}; the critic cannot "
                    "critique before it exists")
        if self.steer_start is not None:
            self.check_layer(self.steer_start, "steer_start")
            if self.steer_start < self.l_in:
                bad(f"steer_start={self.steer_start} is before l_in={self.l_in}")
        if not (isinstance(self.steer_scale, (int, float)) and math.isfinite(self.steer_scale)
                and self.steer_scale >= 0):
            bad(f"steer_scale must be a finite number >= 0, got {self.steer_scale!r}")
        if self.head_hidden < 1:
            bad(f"head_hidden must be >= 1, got {self.head_hidden}")
        if self.adapter_rank < 0:
            bad(f"adapter_rank must be >= 0, got {self.adapter_rank}")
        if isinstance(self.steer_rank, bool) or not isinstance(self.steer_rank, int) or self.steer_rank < 0:
            bad(f"steer_rank must be an integer >= 0, got {self.steer_rank!r}")
        if not isinstance(self.steer_conditioned, bool):
            bad(f"steer_conditioned must be true or false, got {self.steer_conditioned!r}")
        if self.steer_attention not in STEER_ATTENTION:
            bad(f"steer_attention must be one of {', '.join(STEER_ATTENTION)}, got {self.steer_attention!r}")

    def check_layer(self, index: int, what: str = "layer") -> None:
        if not isinstance(index, int) or isinstance(index, bool):
            raise EditSteerConfigError(f"CriticConfig: {what} must be an integer block index, got {index!r}")
        if not 0 <= index < self.depth:
            raise EditSteerConfigError(
                f"CriticConfig: {what}={index} is past the model's depth: valid block indices are 0..{self.depth - 1}"
                f" ({self.describe_depth()})")

    def describe_depth(self) -> str:
        if self.arch == "flux":
            return (f"{self.num_double} double-stream blocks 0..{self.num_double - 1}, then "
                    f"{self.depth - self.num_double} single-stream blocks {self.num_double}..{self.depth - 1}")
        return f"{self.depth} double-stream blocks"

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def first_steer_block(self) -> int:
        return self.l_in + 1 if self.steer_start is None else self.steer_start

    @property
    def placement(self) -> str:
        return PLACEMENT[self.arch]

    def block_mode(self, index: int, mode: str | None = None) -> str:
        """How block ``index`` treats the critic rows under run mode ``mode`` (default: the config's mode).

        ``"off"``: no critic rows exist. ``"dormant"`` (blocks before ``l_in``): the rows exist but nobody attends
        to them and their own attention output is zero (they are reset at ``l_in``). ``"read"``: the critic attends
        to every token, no token attends to it. ``"steer"``: every token also attends to the critic.
        """
        mode = self.mode if mode is None else check_mode(mode)
        if mode == "off":
            return "off"
        if index < self.l_in:
            return "dormant"
        if mode == "steer" and index >= self.first_steer_block:
            return "steer"
        return "read"

    def adapter_blocks(self) -> tuple[int, ...]:
        """Blocks that carry a low-rank critic adapter: every block from ``l_in`` on (none when rank is 0)."""
        return tuple(range(self.l_in, self.depth)) if self.adapter_rank else ()

    def gate_blocks(self) -> tuple[int, ...]:
        """Blocks that carry a decoupled-steering gate: every steering block (none for ``joint`` steering)."""
        return tuple(range(self.first_steer_block, self.depth)) if self.steer_attention == "decoupled" else ()

    def steer_adapter_blocks(self) -> tuple[int, ...]:
        """Blocks that carry a steering adapter: every steering block (none when ``steer_rank`` is 0)."""
        return tuple(range(self.first_steer_block, self.depth)) if self.steer_rank else ()

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["l_c"] = list(self.l_c)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CriticConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EditSteerConfigError(f"CriticConfig: unknown fields {unknown} (written by a newer EditSteer?)")
        return cls(**d)

    def replace(self, **changes) -> "CriticConfig":
        return replace(self, **changes)

    def metadata(self) -> dict[str, str]:
        """String metadata stored in the critic's safetensors file (read back and validated on load)."""
        return {
            "format": "pt",
            "editsteer_kind": "inline-critic",
            "arch": self.arch,
            "base_model": self.base_model,
            "width": str(self.width),
            "depth": str(self.depth),
            "num_heads": str(self.num_heads),
            "l_in": str(self.l_in),
            "l_c": ",".join(str(x) for x in self.l_c),
            "n_c": str(self.n_tokens),
            "placement": self.placement,
            "stage": str(self.stage),
            "adapter_rank": str(self.adapter_rank),
            "steer_attention": self.steer_attention,
            "steer_rank": str(self.steer_rank),
            "trainable": "critic tokens, critique head" + (
                f", per-block critic q/k/v adapters (rank {self.adapter_rank} + offsets)" if self.adapter_rank else "")
            + (", per-head gates of the decoupled critic attention" if self.steer_attention == "decoupled" else "")
            + (f", steering adapters on the image rows' q/k/v and attention output (rank {self.steer_rank}, "
               + ("bottleneck scaled by the critic" if self.steer_conditioned else "unconditioned")
               + "; backbone weights frozen)" if self.steer_rank else ""),
            "pack_version": PACK_VERSION,
            "config": self.to_json(),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "<file>") -> "CriticConfig":
        if meta.get("editsteer_kind") != "inline-critic" or "config" not in meta:
            raise ModelFamilyError(f"{source} is not an EditSteer Inline Critic weight file (its safetensors "
                                   "metadata has no editsteer_kind='inline-critic' / config)")
        if meta.get("pack_version") != PACK_VERSION:
            raise ModelFamilyError(f"{source} was written with critic pack_version {meta.get('pack_version')!r}; "
                                   f"this EditSteer reads version {PACK_VERSION}")
        config = cls.from_dict(json.loads(meta["config"]))
        found = meta.get("placement")
        if found != config.placement:
            legacy, change = LEGACY_PLACEMENT.get(config.arch, (None, ""))
            if found is None or found != legacy:
                raise ModelFamilyError(
                    f"{source} places its critic rows as {found!r}, but this EditSteer places {config.arch} critics "
                    f"as {config.placement!r}; its predictions would not be the ones it was trained for")
            logger.warning("%s was written with an earlier %s critic placement: %s. Saving it again records the "
                           "current placement.", source, config.arch, change)
        return config


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise EditSteerConfigError(f"unknown Inline Critic mode {mode!r}; modes are {', '.join(MODES)}")
    return mode

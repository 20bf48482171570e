"""``AnchorEditSession``: an editing conversation with a causal Wan, one ``edit(instruction)`` per turn.

A session holds the source latent (frame 0, the anchor), every turn's clean latent, instruction embedding and seed,
and the sink + window KV cache. ``edit`` samples the next turn against the cache, decodes it, and writes its clean
prediction back into the cache; ``undo`` drops the last turn (exactly: the cache keeps a copy of what the last
writes evicted, or is rebuilt from the kept latents); ``save``/``load`` store everything as ``NAME.safetensors``
(tensors) + ``NAME.json`` (instructions, seeds, settings, the model's fingerprint), so work is never lost between
calls and a loaded session continues exactly as the original would have.

Every call either succeeds or leaves the session exactly as it was (a bad instruction, too many turns, an
interrupt in the middle of sampling, a failed decode).

Frame 0 (the source) is written into the cache with the *empty* instruction, in both CFG branches, as the pack's
trainer (:mod:`diffusers_ext.anchoredit.data`) shows it to the model. This deviates from the official code on
purpose: its inference prefills frame 0 with the first turn's instruction (``prompts[0]``, "prompt slot 0") and,
with CFG, the unconditional branch's frame 0 with the negative prompt, while its training lets frame 0 see only the
first token of that prompt (a placeholder). The pack's weights were trained with the empty instruction, so frame 0's
keys and values do not depend on what the first turn asks, and an instruction-free source is what every turn reads.

A session file records the model's fingerprint (:func:`model_fingerprint`): it loads into the same model in another
dtype or on another device (the cache is converted), and is refused for another model.

Example::

    from diffusers_ext.anchoredit import AnchorEditPipeline, AnchorEditSession
    from diffusers_ext.toy import world

    pipe = AnchorEditPipeline.from_toy()
    seq = world.make_sequence("heldout", seed=0, index=0, turns=4)
    s = pipe.start_session(seq.source, seed=0)
    for text in seq.instructions[:3]:
        img = s.edit(text)                      # PIL image of this turn
    s.undo()                                    # back to turn 2
    s.save("runs/my_session")                   # runs/my_session.safetensors + runs/my_session.json
    s2 = AnchorEditSession.load(pipe, "runs/my_session")
    [t.instruction for t in s2.history]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..errors import EditSteerConfigError, ModelFamilyError
from .apply import anchoredit_forward
from .cache import AnchorKVCache
from .config import AnchorEditConfig, SamplerConfig
from .sampling import StepCallback, sample_turn

FORMAT = "editsteer-anchoredit-session"
#: 2: the fingerprint hashes the probe weights as bfloat16 (dtype-independent); 1 hashed them in their own dtype
FORMAT_VERSION = 2


@dataclass
class TurnRecord:
    """One finished turn: its 1-based index, instruction, noise seed and image (uint8 HxWx3)."""

    turn: int
    instruction: str
    seed: int
    image: np.ndarray

    @property
    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def _probes(pipe) -> list[tuple[str, torch.Tensor]]:
    tr = pipe.transformer
    last = tr.blocks[-1]
    return [("scale_shift_table", tr.scale_shift_table), ("proj_out.bias", tr.proj_out.bias),
            ("patch_embedding.bias", tr.patch_embedding.bias),
            ("blocks.0.scale_shift_table", tr.blocks[0].scale_shift_table),
            ("blocks.-1.ffn.net.-1.bias", last.ffn.net[-1].bias) if hasattr(last.ffn, "net")
            else ("blocks.-1.scale_shift_table", last.scale_shift_table)]


def _fingerprint(pipe, probe_bytes) -> str:
    h = hashlib.sha256()
    for module in (pipe.transformer, pipe.vae):
        h.update(type(module).__name__.encode())
        h.update(json.dumps({k: v for k, v in dict(module.config).items() if not k.startswith("_")},
                            sort_keys=True, default=str).encode())
    for name, p in _probes(pipe):
        h.update(probe_bytes(name, p.detach()))
    h.update(str(pipe.text_encoder.config.to_dict().get("d_model")).encode() if pipe.text_encoder is not None else b"")
    return h.hexdigest()[:16]


def model_fingerprint(pipe) -> str:
    """A short hash of the architecture and a few weights of the transformer and VAE: sessions (their KV caches)
    are only valid with the model that made them.

    The probe weights are hashed as bfloat16, so the same model in float32 or bfloat16 (ComfyUI's GPU dtype), on any
    device, has one fingerprint; weights that differ beyond bfloat16's precision give another."""
    return _fingerprint(pipe, lambda name, p: p.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())


def _fingerprints_v1(pipe) -> set[str]:
    """The fingerprints a session file of format 1 may carry for ``pipe``'s model: format 1 hashed the probes in
    their own dtype (as float32 bytes), so the same model gave one fingerprint per dtype. Recognised: this pipeline
    as it is, and (from float32 weights) as ``pipe.to(torch.bfloat16)`` and as ``from_pretrained(dtype=bfloat16)``
    would have had it (the latter keeps diffusers' ``_keep_in_fp32_modules`` in float32)."""
    keep = set(getattr(pipe.transformer, "_keep_in_fp32_modules", None) or ())

    def as_is(name, p):
        return p.float().cpu().numpy().tobytes()

    def cast_all(name, p):
        return p.to(torch.bfloat16).float().cpu().numpy().tobytes()

    def cast_loaded(name, p):
        return as_is(name, p) if keep & set(name.split(".")) else cast_all(name, p)

    return {_fingerprint(pipe, f) for f in (as_is, cast_all, cast_loaded)}


def _session_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


class AnchorEditSession:
    """See the module docstring. Create with ``pipe.start_session(image, seed=...)`` or
    :meth:`AnchorEditSession.load`."""

    def __init__(self, pipe, image, *, seed: int = 0, sampler: SamplerConfig | None = None, _prefill: bool = True):
        self.pipe = pipe
        self.runtime = pipe.runtime()
        self.config: AnchorEditConfig = self.runtime.config
        self.sampler: SamplerConfig = sampler or pipe.sampler_config
        if not isinstance(self.sampler, SamplerConfig):
            raise EditSteerConfigError(f"sampler must be a SamplerConfig, got {type(self.sampler).__name__}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise EditSteerConfigError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.fingerprint = model_fingerprint(pipe)
        self.turn_times: list[float] = []
        self._cache: AnchorKVCache | None = None
        if not _prefill:
            return
        source = pipe.image_to_tensor(image)  # validates the size before anything else
        self.source = _uint8(source)
        self._null = pipe.encode_instructions([""])
        self._neg = pipe.encode_instructions([self.sampler.negative_prompt]) if self.sampler.cfg else None
        latent0 = pipe.encode_image(source)
        self.latents: list[torch.Tensor] = [latent0]
        self.embeds: list[torch.Tensor] = [self._null]
        self.instructions: list[str] = []
        self.seeds: list[int] = []
        self.images: list[np.ndarray] = [self.source]
        self.cache = self._build_cache(1)

    # ------------------------------------------------------------------------------------------------------------
    # state

    @property
    def turns(self) -> int:
        """Finished turns (edits) so far."""
        return len(self.instructions)

    @property
    def history(self) -> list[TurnRecord]:
        return [TurnRecord(i + 1, t, s, img) for i, (t, s, img) in
                enumerate(zip(self.instructions, self.seeds, self.images[1:]))]

    @property
    def image(self) -> np.ndarray:
        """The current image (the source before the first edit), uint8 HxWx3."""
        return self.images[-1]

    @property
    def batch(self) -> int:
        return 2 if self.sampler.cfg else 1

    @property
    def cache(self) -> AnchorKVCache:
        """The sink + window KV cache. After :meth:`fork` with ``take_cache=True`` gave it away, the first access
        rebuilds it from the kept latents (one transformer pass per frame; the pipeline must be on its device)."""
        if self._cache is None:
            self._check_runtime()
            self._cache = self._build_cache(len(self.latents))
        return self._cache

    @cache.setter
    def cache(self, value: AnchorKVCache) -> None:
        self._cache = value

    @property
    def holds_cache(self) -> bool:
        """False while a fork holds this session's cache (it is rebuilt when needed, see :meth:`fork`)."""
        return self._cache is not None

    def cache_bytes(self) -> int:
        """Bytes this session's KV cache holds now (0 while a fork holds it)."""
        return 0 if self._cache is None else self._cache.nbytes()

    def fork(self, *, take_cache: bool = False) -> "AnchorEditSession":
        """An independent copy: edit the copy without changing this session.

        The copy gets a clone of the KV cache; with ``take_cache=True`` it gets the cache itself, and this session
        rebuilds its own from its kept latents and instructions only if it is used again (one transformer pass per
        frame, the same keys and values when computed on the same device and dtype). Every turn, instruction,
        latent and image of this session stays as it was. ComfyUI's turn nodes fork this way: ComfyUI keeps each
        node's output session alive, so cloning would hold one whole cache per turn of a chain.
        """
        new = copy.copy(self)
        if take_cache:
            new._cache, self._cache = self._cache, None
        else:
            new._cache = None if self._cache is None else self._cache.clone()
        for name in ("latents", "embeds", "instructions", "seeds", "images", "turn_times"):
            setattr(new, name, list(getattr(self, name)))
        return new

    # ------------------------------------------------------------------------------------------------------------
    # model calls

    def _check_runtime(self) -> None:
        from .apply import get_runtime

        rt = get_runtime(self.pipe.transformer)
        if rt is None or rt.config != self.config:
            raise EditSteerConfigError("the pipeline's AnchorEdit settings changed since this session started (or "
                                       "AnchorEdit was removed); set them back, or start a new session")
        self.runtime = rt

    def _context(self, embed: torch.Tensor, frame0: bool = False) -> torch.Tensor:
        """[batch, 1, L, D] context of one frame: the instruction (and the negative prompt for the CFG branch)."""
        if self.batch == 1:
            return embed[:, None]
        uncond = embed if frame0 else self._neg
        return torch.cat([embed, uncond])[:, None]

    def _write(self, cache: AnchorKVCache, latent: torch.Tensor, embed: torch.Tensor, frame0: bool = False) -> None:
        b = self.batch
        t = torch.full((b,), float(self.config.context_timestep), device=latent.device)
        with torch.no_grad():
            anchoredit_forward(self.pipe.transformer, latent.expand(b, -1, -1, -1, -1), t,
                               self._context(embed, frame0), cache=cache, write=True)

    def _build_cache(self, frames: int) -> AnchorKVCache:
        """A fresh cache holding frames 0..frames-1 (the source and the first ``frames - 1`` turns)."""
        cache = self.runtime.new_cache()
        for j in range(frames):
            self._write(cache, self.latents[j], self.embeds[j], frame0=(j == 0))
        return cache

    # ------------------------------------------------------------------------------------------------------------
    # editing

    def edit(self, instruction: str, *, seed: int | None = None, output_type: str = "pil",
             callback: StepCallback | None = None):
        """Edit the current image with ``instruction`` (one turn); return the new image.

        ``seed`` overrides the turn's noise seed (default ``session seed + 7919 * turn``). ``callback(step, total,
        x0)`` is called after every denoising step (progress, previews); an exception it raises (an interrupt)
        aborts the turn and leaves the session unchanged. ``output_type``: "pil", "np" (uint8) or "latent".
        """
        if not isinstance(instruction, str):
            raise EditSteerConfigError(f"an instruction must be a string, got {type(instruction).__name__}")
        if output_type not in ("pil", "np", "latent"):
            raise EditSteerConfigError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        turn = self.turns + 1
        if turn > self.config.max_turns:
            raise EditSteerConfigError(
                f"this session already has {self.turns} turns, the most this model is configured for "
                f"(max_turns={self.config.max_turns}); undo, or start a new session from the current image")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise EditSteerConfigError(f"seed must be an integer, got {seed!r}")
        self._check_runtime()
        cache = self.cache
        t0 = time.perf_counter()
        turn_seed = self.sampler.turn_seed(self.seed, turn) if seed is None else int(seed)
        embed = self.pipe.encode_instructions([instruction])
        ctx = self._context(embed)
        latent0 = self.latents[0]
        b, g = self.batch, self.sampler.guidance_scale
        tr = self.pipe.transformer

        def predict(x, t):
            tt = torch.full((b,), float(t), device=x.device)
            v = anchoredit_forward(tr, x.expand(b, -1, -1, -1, -1), tt, ctx, cache=cache, write=False)
            if b == 2:
                vc, vu = v.float().chunk(2)
                v = (vu + g * (vc - vu)).to(x.dtype)
            return v

        gen = torch.Generator(device="cpu").manual_seed(turn_seed)
        with torch.no_grad():
            x0 = sample_turn(predict, latent0.shape, self.sampler, gen, device=latent0.device, dtype=latent0.dtype,
                             callback=callback)
            image = self.pipe.decode_latents(x0)[0]
            self._write(cache, x0, embed)  # commits only if the whole pass succeeds
        # nothing below can fail: the turn is recorded
        self.latents.append(x0)
        self.embeds.append(embed)
        self.instructions.append(instruction)
        self.seeds.append(turn_seed)
        self.images.append(image)
        self.turn_times.append(time.perf_counter() - t0)
        return self._output(image, x0, output_type)

    def _output(self, image: np.ndarray, latent: torch.Tensor, output_type: str):
        if output_type == "np":
            return image
        if output_type == "latent":
            return latent
        from PIL import Image

        return Image.fromarray(image)

    def undo(self, turns: int = 1, output_type: str = "pil"):
        """Drop the last ``turns`` turns; return the image that is current afterwards."""
        if not isinstance(turns, int) or turns < 1:
            raise EditSteerConfigError(f"turns must be a positive integer, got {turns!r}")
        if turns > self.turns:
            raise EditSteerConfigError(f"cannot undo {turns} turn(s): the session has {self.turns}")
        keep = len(self.latents) - turns
        if self._cache is None:
            pass  # given away by fork(take_cache=True): rebuilt from the kept latents when needed
        elif self._cache.can_pop(turns):
            self._cache.truncate(keep)
        else:  # an evicted frame is no longer kept: rebuild the cache from the kept latents (exact, one pass/frame)
            self._check_runtime()
            self.cache = self._build_cache(keep)
        for name in ("latents", "embeds", "images"):
            del getattr(self, name)[keep:]
        del self.instructions[keep - 1:]
        del self.seeds[keep - 1:]
        del self.turn_times[keep - 1:]
        return self._output(self.images[-1], self.latents[-1], output_type)

    # ------------------------------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str | os.PathLike, *, include_cache: bool = True) -> tuple[Path, Path]:
        """Write ``PATH.safetensors`` (latents, instruction embeddings, images, KV cache) and ``PATH.json``.

        Without the cache (``include_cache=False``, much smaller for full-size models) ``load`` rebuilds it with one
        transformer pass per turn. Both files are written atomically.
        """
        from ..weights import save_safetensors, sha256_file

        st_path, js_path = _session_paths(path)
        st_path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, (lat, emb, img) in enumerate(zip(self.latents, self.embeds, self.images)):
            tensors[f"latents.{i}"] = lat.detach().cpu().contiguous()
            tensors[f"embeds.{i}"] = emb.detach().cpu().contiguous()
            tensors[f"images.{i}"] = torch.from_numpy(np.ascontiguousarray(img))
        if self._neg is not None:
            tensors["negative_embeds"] = self._neg.detach().cpu().contiguous()
        cache_meta = None
        if include_cache:
            ct, cache_meta = self.cache.state_dict()
            tensors.update({k: v.detach().cpu() for k, v in ct.items()})
        save_safetensors(tensors, st_path, metadata={"format": FORMAT, "editsteer": __version__})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "editsteer_version": __version__,
            "model_fingerprint": self.fingerprint,
            "transformer": type(self.pipe.transformer).__name__,
            "anchoredit": self.config.to_dict(), "sampler": self.sampler.to_dict(), "seed": self.seed,
            "instructions": list(self.instructions), "seeds": list(self.seeds),
            "image_size": list(self.source.shape[:2]), "cache": cache_meta,
            "tensors_file": st_path.name, "tensors_sha256": sha256_file(st_path, use_cache=False),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp = js_path.with_name(js_path.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, js_path)
        return st_path, js_path

    @classmethod
    def load(cls, pipe, path: str | os.PathLike, *, allow_other_model: bool = False) -> "AnchorEditSession":
        """Load a session saved by :meth:`save` for ``pipe``'s model.

        The same model in another dtype or on another device loads (the cache is converted). A session file from
        another model (another fingerprint) is refused with :class:`~diffusers_ext.errors.ModelFamilyError`, unless
        ``allow_other_model=True``: then the images and latents are kept, the instructions (and the empty and
        negative prompts) are encoded again with this model's text encoder, and the KV cache is recomputed with this
        model (possible only with the same latent shape). Files of format 1 (whose fingerprint depended on the
        dtype) load into the model they were made with in that dtype, and from float32 weights also when they were
        made in bfloat16.
        """
        from ..weights import load_safetensors, sha256_file

        st_path, js_path = _session_paths(path)
        if not js_path.is_file() or not st_path.is_file():
            raise EditSteerConfigError(f"no session at {path}: expected {st_path.name} and {js_path.name}")
        try:
            meta = json.loads(js_path.read_text())
        except json.JSONDecodeError as e:
            raise EditSteerConfigError(f"{js_path} is not a session file (invalid JSON: {e})") from None
        if meta.get("format") != FORMAT:
            raise EditSteerConfigError(f"{js_path} is not an AnchorEdit session file (format {meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise EditSteerConfigError(f"{js_path} was written by a newer EditSteer (session format "
                                       f"{meta['format_version']}); upgrade the pack")
        if sha256_file(st_path, use_cache=False) != meta.get("tensors_sha256"):
            raise EditSteerConfigError(f"{st_path} does not match {js_path.name} (sha256 differs): the two files "
                                       "belong to different saves; keep them together")
        fp = model_fingerprint(pipe)
        legacy = int(meta.get("format_version", 0)) < 2
        same_model = meta["model_fingerprint"] in (_fingerprints_v1(pipe) if legacy else {fp})
        if not same_model and not allow_other_model:
            if legacy:
                raise ModelFamilyError(
                    f"session {js_path.name} was saved by EditSteer {meta.get('editsteer_version', '?')}, whose "
                    f"model fingerprint ({meta['model_fingerprint']}) depended on the weights' dtype, and it matches "
                    f"neither this pipeline's model in its dtype ({pipe.transformer.dtype}) nor in bfloat16. If it "
                    "was made with this model in float32 and this pipeline is bfloat16, load it once with a float32 "
                    "pipeline of the model and save it again; if it was made with another model, load it with that "
                    "one. Or pass allow_other_model=True to keep the images and recompute the memory with this model.")
            raise ModelFamilyError(
                f"session {js_path.name} was made with another model (fingerprint {meta['model_fingerprint']}, "
                f"{meta.get('transformer')}); this pipeline's model is {fp}. Its KV cache is only valid with that "
                "model: load it with the pipeline that made it, or pass allow_other_model=True to keep the images "
                "and recompute the memory with this model.")
        cfg = AnchorEditConfig.from_dict(meta["anchoredit"])
        if cfg != pipe.anchoredit_config:
            raise EditSteerConfigError(f"session {js_path.name} uses AnchorEdit settings {cfg}, the pipeline has "
                                       f"{pipe.anchoredit_config}; call pipe.set_anchoredit(...) with the session's "
                                       "settings first")
        tensors = load_safetensors(st_path)
        s = cls(pipe, None, seed=int(meta["seed"]), sampler=SamplerConfig.from_dict(meta["sampler"]), _prefill=False)
        dev, dt = pipe.transformer.device, pipe.transformer.dtype
        n = len(meta["instructions"]) + 1
        s.latents = [tensors[f"latents.{i}"].to(dev, dt) for i in range(n)]
        if s.latents[0].shape[1] != pipe.transformer.config.in_channels:
            raise ModelFamilyError(f"session latents have {s.latents[0].shape[1]} channels, this model takes "
                                   f"{pipe.transformer.config.in_channels}; load it with the model that made it")
        s.images = [tensors[f"images.{i}"].numpy().copy() for i in range(n)]
        s.source = s.images[0]
        s.instructions = list(meta["instructions"])
        if same_model:
            s.embeds = [tensors[f"embeds.{i}"].to(dev, dt) for i in range(n)]
            s._null = s.embeds[0]
            s._neg = tensors["negative_embeds"].to(dev, dt) if "negative_embeds" in tensors else (
                pipe.encode_instructions([s.sampler.negative_prompt]) if s.sampler.cfg else None)
        else:  # the stored embeddings are the other model's text encoder's: encode the texts with this one
            s._null = pipe.encode_instructions([""])
            s.embeds = [s._null] + [pipe.encode_instructions([t]) for t in s.instructions]
            s._neg = pipe.encode_instructions([s.sampler.negative_prompt]) if s.sampler.cfg else None
        s.seeds = [int(x) for x in meta["seeds"]]
        s.turn_times = []
        if same_model and meta.get("cache") is not None:
            s.cache = AnchorKVCache.from_state_dict({k: v for k, v in tensors.items() if k.startswith("cache.")},
                                                    meta["cache"], device=dev)
            if s.cache.layout is not None and s.cache.layout.dtype != dt:
                s.cache.to(dtype=dt)
        else:
            s.cache = s._build_cache(n)
        return s

    def __repr__(self) -> str:
        cache = repr(self._cache) if self._cache is not None else "(held by a fork; rebuilt when needed)"
        return f"AnchorEditSession(turns={self.turns}, seed={self.seed}, sampler={self.sampler.kind}, cache={cache})"


def _uint8(t: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> uint8 HxWx3 (the source as the session shows it)."""
    return t[0].float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


__all__ = ["AnchorEditSession", "TurnRecord", "model_fingerprint"]

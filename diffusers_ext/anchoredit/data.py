"""Training data for AnchorEdit: single-turn pairs and multi-turn sequences as normalised Wan latents.

* :class:`ToyWorldData` draws from the toy world (``world.make_case`` / ``world.make_sequence`` on the ``train``
  split), encodes images with the pipeline's VAE and instructions with its text encoder, and memoises both (a fixed
  pool of cases/sequences, so the VAE runs once per image).
* :class:`JsonSequenceData` reads real multi-turn data: a JSON list of ``{"images": [source, turn1, ...],
  "instructions": [...]}`` (paths relative to the JSON file), the layout the official ``data_generation`` writes
  once unpacked from its tars. All images of a sample must share one size that fits the patch grid.

Both return latents ``[B, C, F, h, w]`` (frame 0 = source) and instruction embeddings ``[B, F, L, D]`` (frame 0 =
the empty instruction). Frame 0 deliberately cross-attends to the empty instruction, in training and in sessions
alike; the official code differs (training: frame 0 sees only the first token of turn 1's prompt; inference: all of
``prompts[0]``, and the negative prompt in the CFG branch), see :mod:`diffusers_ext.anchoredit.session`.

Instruction embeddings are memoised in a bounded LRU (:class:`_Encoders`): on the CPU, without their zero padding,
so that real data, which brings new instructions every step, cannot fill the accelerator (a padded Wan embedding
is 512 x 4096 floats, 8 MiB in float32).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import EditSteerConfigError

#: default bound of the instruction-embedding memo (bytes of the stored, unpadded embeddings)
TEXT_CACHE_BYTES = 1 << 30


class _Encoders:
    """The pipeline's VAE and text encoder, with instruction embeddings memoised.

    The memo is a least-recently-used cache of at most ``text_cache_bytes`` bytes. Entries are kept on the CPU
    without their trailing zero rows (``encode_instructions`` zero-pads every instruction to ``max_sequence_length``)
    and padded and moved back on use: the returned tensors are exactly those ``encode_instructions`` gave. A bound
    large enough for the whole toy vocabulary keeps the toy runs re-encoding nothing, as before the bound.
    """

    def __init__(self, pipe, text_cache_bytes: int = TEXT_CACHE_BYTES):
        self.pipe = pipe
        self.text_cache_bytes = int(text_cache_bytes)
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_bytes = 0
        self._shape: tuple[int, int] | None = None  # (L, D) of a padded embedding
        self._where: tuple[torch.device, torch.dtype] | None = None

    def text(self, instructions: list[str]) -> torch.Tensor:
        """Embeddings ``[N, L, D]`` of ``instructions`` (on the transformer's device), memoised."""
        found: dict[str, torch.Tensor] = {}
        missing = []
        for s in dict.fromkeys(instructions):
            if s in self._text:
                self._text.move_to_end(s)
                found[s] = self._text[s]
            else:
                missing.append(s)
        if missing:
            emb = self.pipe.encode_instructions(missing)
            self._shape, self._where = tuple(emb.shape[1:]), (emb.device, emb.dtype)
            for s, e in zip(missing, emb):
                found[s] = self._store(s, e)
        L, D = self._shape
        dev, dt = self._where
        out = torch.zeros(len(instructions), L, D, dtype=dt)
        for i, s in enumerate(instructions):
            e = found[s]
            out[i, :e.shape[0]] = e
        return out.to(dev)

    def _store(self, s: str, e: torch.Tensor) -> torch.Tensor:
        rows = e.detach().flatten(1).ne(0).any(1).nonzero()
        n = int(rows[-1]) + 1 if len(rows) else 0
        kept = e[:n].detach().to("cpu", copy=True)
        self._text[s] = kept
        self._text_bytes += kept.numel() * kept.element_size()
        while self._text_bytes > self.text_cache_bytes and len(self._text) > 1:
            _, old = self._text.popitem(last=False)
            self._text_bytes -= old.numel() * old.element_size()
        return kept

    @property
    def text_cache_size(self) -> tuple[int, int]:
        """(instructions memoised, bytes they take)."""
        return len(self._text), self._text_bytes

    @torch.no_grad()
    def images(self, images: list[np.ndarray], batch: int = 64) -> torch.Tensor:
        """uint8 images -> normalised latents [N, C, h, w]."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.stack(images[i:i + batch])).float().div(127.5).sub(1).permute(0, 3, 1, 2)
            x = x.to(self.pipe.vae.device, self.pipe.vae.dtype).unsqueeze(2)
            z = self.pipe.vae.encode(x).latent_dist.mode()
            mean, std = self.pipe._latent_stats(z.device, z.dtype)
            out.append(((z - mean) / std)[:, :, 0].to(self.pipe.transformer.dtype))
        return torch.cat(out)


class ToyWorldData:
    """Toy-world pairs and sequences (train split), pools of ``pool_cases`` cases and ``pool_sequences`` sequences
    of ``max_turns`` turns (shorter sequences are prefixes)."""

    def __init__(self, pipe, *, seed: int = 0, pool_cases: int = 4096, pool_sequences: int = 1024,
                 max_turns: int = 8, split: str = "train"):
        self.enc = _Encoders(pipe)
        self.seed, self.split = seed, split
        self.pool_cases, self.pool_sequences, self.max_turns = pool_cases, pool_sequences, max_turns
        self._cases: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}
        self._seqs: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self.null = self.enc.text([""])[0]

    def _case(self, i: int):
        if i not in self._cases:
            from ..toy import world as W

            c = W.make_case(self.split, self.seed, i)
            lat = self.enc.images([c.source, c.target])
            self._cases[i] = (lat[0], lat[1], c.instruction)
        return self._cases[i]

    def _seq(self, i: int):
        if i not in self._seqs:
            from ..toy import world as W

            s = W.make_sequence(self.split, self.seed, i, turns=self.max_turns)
            self._seqs[i] = (self.enc.images(list(s.images)), s.instructions)
        return self._seqs[i]

    def warm(self, cases: bool = True, sequences: bool = True) -> None:
        """Encode the whole pool now (batched), instead of lazily."""
        from ..toy import world as W

        if cases:
            todo = [i for i in range(self.pool_cases) if i not in self._cases]
            for j in range(0, len(todo), 256):
                chunk = [W.make_case(self.split, self.seed, i) for i in todo[j:j + 256]]
                lat = self.enc.images([im for c in chunk for im in (c.source, c.target)])
                for n, (i, c) in enumerate(zip(todo[j:j + 256], chunk)):
                    self._cases[i] = (lat[2 * n], lat[2 * n + 1], c.instruction)
        if sequences:
            todo = [i for i in range(self.pool_sequences) if i not in self._seqs]
            per = self.max_turns + 1
            for j in range(0, len(todo), 32):
                chunk = [W.make_sequence(self.split, self.seed, i, turns=self.max_turns) for i in todo[j:j + 32]]
                lat = self.enc.images([im for s in chunk for im in s.images])
                for n, (i, s) in enumerate(zip(todo[j:j + 32], chunk)):
                    self._seqs[i] = (lat[n * per:(n + 1) * per], s.instructions)

    def pairs(self, g: torch.Generator, batch: int):
        """(source [B, C, h, w], target [B, C, h, w], instruction embeddings [B, L, D])."""
        idx = torch.randint(self.pool_cases, (batch,), generator=g).tolist()
        items = [self._case(i) for i in idx]
        return (torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items]),
                self.enc.text([t for _, _, t in items]))

    def sequences(self, g: torch.Generator, batch: int, turns: int):
        """(latents [B, C, turns+1, h, w], embeddings [B, turns+1, L, D]); frame 0 has the empty instruction."""
        if turns > self.max_turns:
            raise EditSteerConfigError(f"asked for {turns} turns, the pool has {self.max_turns}")
        idx = torch.randint(self.pool_sequences, (batch,), generator=g).tolist()
        items = [self._seq(i) for i in idx]
        lat = torch.stack([x[:turns + 1] for x, _ in items]).permute(0, 2, 1, 3, 4)
        emb = torch.stack([torch.cat([self.null[None], self.enc.text(ins[:turns])]) for _, ins in items])
        return lat.contiguous(), emb


class JsonSequenceData:
    """Real multi-turn data from a JSON file (see the module docstring); sequences shorter than asked are skipped."""

    def __init__(self, pipe, path: str | Path, *, max_turns: int = 5):
        self.enc = _Encoders(pipe)
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EditSteerConfigError(f"cannot read training data {path}: {e}") from None
        samples = data["samples"] if isinstance(data, dict) else data
        self.samples = [s for s in samples if len(s.get("images", [])) == len(s.get("instructions", [])) + 1]
        if not self.samples:
            raise EditSteerConfigError(f"{path} holds no sample with images = instructions + 1")
        self.max_turns = max_turns
        self.null = self.enc.text([""])[0]

    def _read(self, s: dict, turns: int) -> list[np.ndarray]:
        from PIL import Image

        root = self.path.parent
        imgs = [np.asarray(Image.open(root / p).convert("RGB")) for p in s["images"][:turns + 1]]
        if len({im.shape for im in imgs}) != 1:
            raise EditSteerConfigError(f"sample {s['images'][0]}: images of one sample must share one size")
        self.enc.pipe.image_to_tensor(imgs[0])  # size check with a clear error
        return imgs

    def pairs(self, g: torch.Generator, batch: int):
        lat, emb = self.sequences(g, batch, 1)
        return lat[:, :, 0], lat[:, :, 1], emb[:, 1]

    def sequences(self, g: torch.Generator, batch: int, turns: int):
        pool = [s for s in self.samples if len(s["instructions"]) >= turns]
        if not pool:
            raise EditSteerConfigError(f"no sample in {self.path} has {turns} turns")
        idx = torch.randint(len(pool), (batch,), generator=g).tolist()
        images = [self._read(pool[i], turns) for i in idx]
        sizes = {im[0].shape[:2] for im in images}
        if len(sizes) > 1:  # one batch is one tensor: its samples must share a size (checked before any encoding)
            listed = ", ".join(f"{pool[i]['images'][0]} {im[0].shape[1]}x{im[0].shape[0]}"
                               for i, im in zip(idx, images))
            raise EditSteerConfigError(
                f"a batch of {batch} samples from {self.path} mixes image sizes ({listed}): the samples of one batch "
                "must share one size. Use --batch-size 1, or a data file whose images all have one size (resize or "
                "crop them, or keep one size bucket per file)")
        items = [(self.enc.images(imgs), pool[i]["instructions"][:turns]) for i, imgs in zip(idx, images)]
        lat = torch.stack([x for x, _ in items]).permute(0, 2, 1, 3, 4)
        emb = torch.stack([torch.cat([self.null[None], self.enc.text(ins)]) for _, ins in items])
        return lat.contiguous(), emb


__all__ = ["JsonSequenceData", "ToyWorldData"]

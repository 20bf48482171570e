"""Training data for AnchorEdit: single-turn pairs and multi-turn sequences as normalised Wan latents.

* :class:`ToyWorldData` draws from the toy world (``world.make_case`` / ``world.make_sequence`` on the ``train``
  split), encodes images with the pipeline's VAE and instructions with its text encoder, and memoises both (a fixed
  pool of cases/sequences, so the VAE runs once per image).
* :class:`JsonSequenceData` reads real multi-turn data: a JSON list of ``{"images": [source, turn1, ...],
  "instructions": [...]}`` (paths relative to the JSON file), the layout the official ``data_generation`` writes
  once unpacked from its tars. All images of a sample must share one size that fits the patch grid.

Both return latents ``[B, C, F, h, w]`` (frame 0 = source) and instruction embeddings ``[B, F, L, D]`` (frame 0 =
the empty instruction).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import EditSteerConfigError


class _Encoders:
    def __init__(self, pipe):
        self.pipe = pipe
        self._text: dict[str, torch.Tensor] = {}

    def text(self, instructions: list[str]) -> torch.Tensor:
        missing = [s for s in dict.fromkeys(instructions) if s not in self._text]
        if missing:
            emb = self.pipe.encode_instructions(missing)
            for s, e in zip(missing, emb):
                self._text[s] = e
        return torch.stack([self._text[s] for s in instructions])

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

    def _load(self, s: dict, turns: int):
        from PIL import Image

        root = self.path.parent
        imgs = [np.asarray(Image.open(root / p).convert("RGB")) for p in s["images"][:turns + 1]]
        if len({im.shape for im in imgs}) != 1:
            raise EditSteerConfigError(f"sample {s['images'][0]}: images of one sample must share one size")
        self.enc.pipe.image_to_tensor(imgs[0])  # size check with a clear error
        return self.enc.images(imgs), s["instructions"][:turns]

    def pairs(self, g: torch.Generator, batch: int):
        lat, emb = self.sequences(g, batch, 1)
        return lat[:, :, 0], lat[:, :, 1], emb[:, 1]

    def sequences(self, g: torch.Generator, batch: int, turns: int):
        pool = [s for s in self.samples if len(s["instructions"]) >= turns]
        if not pool:
            raise EditSteerConfigError(f"no sample in {self.path} has {turns} turns")
        idx = torch.randint(len(pool), (batch,), generator=g).tolist()
        items = [self._load(pool[i], turns) for i in idx]
        lat = torch.stack([x for x, _ in items]).permute(0, 2, 1, 3, 4)
        emb = torch.stack([torch.cat([self.null[None], self.enc.text(ins)]) for _, ins in items])
        return lat.contiguous(), emb


__all__ = ["JsonSequenceData", "ToyWorldData"]

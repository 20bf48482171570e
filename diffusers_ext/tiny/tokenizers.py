"""Tokenizers built locally (no download), of the real transformers classes the editors use.

With ``words`` the vocabulary holds those whole words (one token each) on top of single characters, so any text
still tokenises; without, every character is a token.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with a tiny BPE vocabulary (characters plus whole ``words``)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(w.lower() for w in words):
        if len(w) < 2 or not all(c in _CHARS for c in w):
            continue
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:  # left-to-right merges: "r e" -> "re", "re d</w>" -> "red</w>"
            a, b = toks[0], toks[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            toks = [a + b] + toks[2:]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_t5_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A ``transformers.T5Tokenizer`` (Unigram) with a tiny vocabulary (characters plus whole ``words``)."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for c in _CHARS:
        for p in (c, "\u2581" + c):
            if p not in seen:
                pieces.append((p, -5.0))
                seen.add(p)
    for w in dict.fromkeys(w.lower() for w in words):
        p = "\u2581" + w
        if p not in seen:
            pieces.append((p, -1.0))
            seen.add(p)
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok

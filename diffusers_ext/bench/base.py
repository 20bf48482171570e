"""The interface every benchmarked method implements (``editsteer bench METHOD``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


@dataclass
class MethodResult:
    """What a method returns for one edit (one turn).

    ``image`` is uint8 HxWx3 at the world's size. ``nfe`` counts transformer forward passes (a CFG pair counts 2).
    ``extras`` are JSON-able per-case values (scores, chosen seed...) copied into ``per_case``; ``images`` are extra
    pictures saved next to the case (e.g. a critic error map as uint8 HxW or HxWx3).
    """

    image: np.ndarray
    nfe: int = 0
    extras: dict = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)


class BenchMethod:
    """Base class. Subclasses set ``name`` and ``kind`` and implement ``edit`` (single) or ``edit_sequence``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "single"  # "single" (EditCase) or "multiturn" (EditSequence)
    description: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Method options (``editsteer bench METHOD --help``)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def settings(self) -> dict:
        """Settings recorded in results.json (model ids, step counts, method constants)."""
        return {}

    def edit(self, case, seed: int) -> MethodResult:  # single-turn
        raise NotImplementedError

    def edit_sequence(self, seq, seed: int) -> list[MethodResult]:  # multi-turn
        raise NotImplementedError

"""Reference methods that need no model."""

from __future__ import annotations

from .base import BenchMethod, MethodResult


class IdentityMethod(BenchMethod):
    """Returns the source unchanged: the floor every editor must beat (perfect background, no edit)."""

    name = "identity"
    kind = "single"
    description = "return the source image unchanged (0 NFE)"

    def edit(self, case, seed: int) -> MethodResult:
        return MethodResult(image=case.source.copy(), nfe=0)


class IdentitySequenceMethod(BenchMethod):
    """Multi-turn floor: every turn returns the source."""

    name = "identity-mt"
    kind = "multiturn"
    description = "return the source at every turn (0 NFE)"

    def edit_sequence(self, seq, seed: int) -> list[MethodResult]:
        return [MethodResult(image=seq.source.copy(), nfe=0) for _ in range(seq.turns)]

"""The toy editing world: scenes, instructions with exact ground truth, metrics, and the trained tiny models."""

from . import metrics, world
from .world import EditCase, EditSequence, make_case, make_cases, make_sequence

__all__ = ["EditCase", "EditSequence", "make_case", "make_cases", "make_sequence", "metrics", "world"]

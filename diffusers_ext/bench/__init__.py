"""Benchmarks on the toy world: ``editsteer bench METHOD``."""

from .base import BenchMethod, MethodResult
from .harness import case_seed, run
from .registry import METHODS, load_method

__all__ = ["METHODS", "BenchMethod", "MethodResult", "case_seed", "load_method", "run"]

"""Error types shared by every part of the pack.

Every error a user can trigger is an :class:`EditSteerError`: its message says what was wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class EditSteerError(Exception):
    """Base class of the pack's user-facing errors."""


class EditSteerConfigError(EditSteerError, ValueError):
    """A configuration value or an input is invalid (wrong size, unknown mode, index out of range...)."""


class ModelFamilyError(EditSteerError, ValueError):
    """A model or weight file belongs to another model family or width than the one it is used with."""


@dataclass
class SearchedLocation:
    """One place the weight resolver looked in, and what it found there."""

    label: str  # "explicit path", "comfyui models", "bundled", "hf cache", "hub"
    where: str  # a folder, a file or "repo@revision"
    outcome: str  # "missing", "sha256 mismatch: ...", "skipped: ...", ...

    def __str__(self) -> str:
        return f"  - {self.label}: {self.where} -> {self.outcome}"


class WeightsError(EditSteerError, FileNotFoundError):
    """A weight artifact could not be found, verified or loaded.

    This is the one error type the weight resolver raises. Its message names the artifact, the Hub repo id, the
    file, every location that was searched and what was found there, and how to fix it.
    """

    def __init__(
        self,
        reason: str,
        *,
        artifact_id: str,
        repo_id: str | None = None,
        filename: str | None = None,
        searched: Sequence[SearchedLocation] = (),
        hint: str = "",
    ):
        self.reason = reason
        self.artifact_id = artifact_id
        self.repo_id = repo_id
        self.filename = filename
        self.searched = list(searched)
        self.hint = hint
        lines = [f"Weights '{artifact_id}': {reason}"]
        if repo_id:
            lines.append(f"  Hub repo: {repo_id}")
        if filename:
            lines.append(f"  file: {filename}")
        if self.searched:
            lines.append("  searched:")
            lines.extend(str(s) for s in self.searched)
        if hint:
            lines.append(f"  how to fix: {hint}")
        self.message = "\n".join(lines)
        super().__init__(self.message)

    def __str__(self) -> str:  # OSError would format errno/filename instead
        return self.message


class UnsafeWeightsError(WeightsError):
    """A file that is not a valid safetensors file (a pickle checkpoint, a truncated or corrupted file)."""


def format_path(p: str | Path) -> str:
    return str(Path(p))

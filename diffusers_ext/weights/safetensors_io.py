"""safetensors-only loading with integrity checks. Nothing in the pack ever unpickles a weight file."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import UnsafeWeightsError

#: Suffixes of pickle-based checkpoint formats that are refused outright.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# (resolved path, size, mtime_ns) -> sha256 hex; hashing multi-GB checkpoints once per process is enough.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """SHA-256 of a file, streamed, remembered per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if use_cache and key in _HASH_CACHE:
        return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        _HASH_CACHE[key] = digest
    return digest


def check_safetensors_header(path: str | os.PathLike, *, artifact_id: str = "<file>") -> dict:
    """Parse and validate a safetensors header without loading tensors; return its JSON.

    Raises :class:`UnsafeWeightsError` for pickle checkpoints, truncated files and malformed headers.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeWeightsError(
            f"'{p.name}' is a pickle-based checkpoint ({p.suffix}); EditSteer loads safetensors only",
            artifact_id=artifact_id,
            filename=str(p),
            hint="convert it once in a trusted environment, e.g. "
            "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`, "
            "and point EditSteer at the .safetensors file",
        )
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnsafeWeightsError(f"'{p.name}' is truncated (only {size} bytes)", artifact_id=artifact_id,
                                     filename=str(p), hint="delete the file and fetch it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise UnsafeWeightsError(
                f"'{p.name}' is not a safetensors file (header length {n} does not fit in {size} bytes; "
                "a pickle checkpoint or a corrupted/truncated download?)",
                artifact_id=artifact_id, filename=str(p), hint="delete the file and fetch it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeWeightsError(f"'{p.name}' has a malformed safetensors header ({e})", artifact_id=artifact_id,
                                 filename=str(p), hint="delete the file and fetch it again") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise UnsafeWeightsError(f"'{p.name}' has a malformed entry '{name}' in its header",
                                     artifact_id=artifact_id, filename=str(p)) from None
    if 8 + n + end > size:
        raise UnsafeWeightsError(
            f"'{p.name}' is truncated: its header needs {8 + n + end} bytes, the file has {size}",
            artifact_id=artifact_id, filename=str(p), hint="delete the file and fetch it again")
    return header


def load_safetensors(path: str | os.PathLike, device: str = "cpu", *, artifact_id: str = "<file>"):
    """Load a state dict from a safetensors file after checking its header (never a pickle)."""
    from safetensors.torch import load_file

    check_safetensors_header(path, artifact_id=artifact_id)
    return load_file(str(path), device=device)


def read_safetensors_metadata(path: str | os.PathLike, *, artifact_id: str = "<file>") -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file ({} when absent)."""
    return dict(check_safetensors_header(path, artifact_id=artifact_id).get("__metadata__", {}) or {})


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors atomically (temp file + rename), so an interrupted save never leaves a valid-looking file."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, p)
    return p

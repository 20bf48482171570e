"""Write a folder into a Hugging Face cache in the exact Hub layout, by hand (no network).

``models--org--name/refs/main`` holds the commit; ``snapshots/<commit>/<file>`` are relative symlinks into
``blobs/`` (sha256 for LFS-type files, git blob sha1 for small text files), as ``huggingface_hub`` writes them.
With ``HF_HUB_OFFLINE=1``, ``hf_hub_download``, ``snapshot_download`` and ``from_pretrained("org/name")`` then
resolve the repo from the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".msgpack", ".h5", ".png", ".jpg")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hf_cache_repo(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, *,
                        revision: str | None = None, branch: str = "main", repo_type: str = "model",
                        use_symlinks: bool = True) -> str:
    """Copy every file of ``folder`` into ``cache_dir`` as ``repo_id`` at ``revision``; return the revision."""
    src = Path(folder)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if revision is None:  # a deterministic fake commit hash derived from the content
        h = hashlib.sha1()
        for p in files:
            h.update(p.relative_to(src).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        revision = h.hexdigest()
    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / branch).write_text(revision)
    snap = repo_dir / "snapshots" / revision
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for p in files:
        data = p.read_bytes()
        rel = p.relative_to(src)
        blob_name = hashlib.sha256(data).hexdigest() if p.suffix in _LFS_SUFFIXES else _git_blob_sha1(data)
        blob = blobs / blob_name
        if not blob.exists():
            blob.write_bytes(data)
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if use_symlinks:
            dst.symlink_to(os.path.relpath(blob, dst.parent))
        else:
            shutil.copyfile(blob, dst)
    return revision


def snapshot_path(cache_dir: str | os.PathLike, repo_id: str, revision: str, repo_type: str = "model") -> Path:
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / revision

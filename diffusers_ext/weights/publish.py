"""Publishing an artifact to the Hub and updating its manifest entry (``editsteer weights publish``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import EditSteerConfigError
from .manifest import Artifact, write_entry
from .resolver import resolve


def publish(artifact_id: str, *, repo_id: str | None = None, folder: str | Path | None = None, token: str | None = None,
            private: bool = False, dry_run: bool = False, manifest_dir: str | Path | None = None) -> Artifact:
    """Upload a verified local copy of an artifact to the Hub; return (and write) the updated manifest entry.

    The entry becomes ``status: published`` with the ``revision`` of the upload commit, so that every Hub file the
    manifest names exists at exactly that revision. ``dry_run`` checks everything but uploads nothing.
    """
    found = resolve(artifact_id, path=folder, allow_download=False, manifest_dir=manifest_dir)
    art = found.artifact
    target = repo_id or art.repo_id
    if not target:
        raise EditSteerConfigError(f"artifact '{art.id}' has no repo_id; pass --repo-id ORG/NAME")
    root = found.path if art.is_folder else found.path.parent
    rel = [f.path for f in art.files] if art.is_folder else [found.path.name]
    if dry_run:
        return dataclasses.replace(art, repo_id=target)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(target, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=target, folder_path=str(root), path_in_repo=art.subfolder or "",
                             allow_patterns=rel, commit_message=f"EditSteer: publish {art.id}")
    new = dataclasses.replace(art, repo_id=target, status="published", revision=info.oid)
    new.validate()
    write_entry(new, manifest_dir)
    return new

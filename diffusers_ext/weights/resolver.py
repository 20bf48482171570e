"""Find, verify and load weight artifacts, local first.

Resolution order (the first location holding a complete, verified copy wins):

1. an explicit path given by the caller (a file or a folder); a bad file there is an error, never skipped;
2. registered local folders: ComfyUI's ``models/editsteer`` folders (registered by the ComfyUI nodes at import),
   and the folders in ``EDITSTEER_WEIGHTS_DIR`` (``os.pathsep``-separated), each as ``<folder>/<artifact id>/...``;
3. the copy bundled with the pack (``diffusers_ext/assets/``), for small toy artifacts;
4. the Hugging Face cache, with ``local_files_only`` semantics (no network);
5. a Hub download (``hf_hub_download`` at the pinned revision), only when allowed: ``allow_download=True`` or
   ``EDITSTEER_ALLOW_DOWNLOAD=1``, and ``HF_HUB_OFFLINE`` unset, and the artifact is published.

Every file is checked against the manifest's size and sha256 before it is returned; a corrupted, truncated or
tampered copy is never loaded. Failures raise :class:`~diffusers_ext.errors.WeightsError`, whose message names the
artifact, the repo id, the file, each folder searched with what was found there, and how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SearchedLocation, UnsafeWeightsError, WeightsError
from .manifest import Artifact, ArtifactFile, assets_dir, get_artifact
from .safetensors_io import check_safetensors_header, load_safetensors, sha256_file

logger = logging.getLogger(__name__)

ENV_ALLOW_DOWNLOAD = "EDITSTEER_ALLOW_DOWNLOAD"
ENV_WEIGHTS_DIR = "EDITSTEER_WEIGHTS_DIR"

# label -> folders; filled by adapters (ComfyUI registers its models/editsteer folders here).
_SEARCH_DIRS: dict[str, list[Path]] = {}


def register_search_dir(path: str | os.PathLike, label: str = "local folder") -> None:
    """Add a folder searched (after an explicit path, before the bundled copy) as ``<folder>/<artifact id>/``."""
    dirs = _SEARCH_DIRS.setdefault(label, [])
    p = Path(path)
    if p not in dirs:
        dirs.append(p)


def unregister_search_dir(path: str | os.PathLike, label: str | None = None) -> None:
    for lab, dirs in list(_SEARCH_DIRS.items()):
        if label is None or lab == label:
            _SEARCH_DIRS[lab] = [d for d in dirs if d != Path(path)]


def search_dirs() -> list[tuple[str, Path]]:
    """Registered folders plus ``EDITSTEER_WEIGHTS_DIR``, in search order."""
    out = [(label, d) for label, dirs in _SEARCH_DIRS.items() for d in dirs]
    for d in filter(None, os.environ.get(ENV_WEIGHTS_DIR, "").split(os.pathsep)):
        out.append(("EDITSTEER_WEIGHTS_DIR", Path(d)))
    return out


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def downloads_allowed(allow_download: bool | None = None) -> bool:
    if allow_download is None:
        allow_download = os.environ.get(ENV_ALLOW_DOWNLOAD, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(allow_download) and not hub_offline()


@dataclass
class ResolvedArtifact:
    """Where a verified copy of an artifact was found."""

    artifact: Artifact
    path: Path  # the file (kind "safetensors") or the artifact's root folder
    source: str  # label of the location
    verified: bool  # every file matched its sha256 (False only for 'external' files without a known hash)
    searched: list[SearchedLocation] = field(default_factory=list)

    def file(self, rel: str | None = None) -> Path:
        """Path of one file of the artifact (the main file by default)."""
        if not self.artifact.is_folder:
            return self.path
        return self.path / (rel or self.artifact.main_file.path)


def _check_file(art: Artifact, f: ArtifactFile, p: Path) -> str | None:
    """None when ``p`` is a valid copy of ``f``; else a short reason."""
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if f.size is not None and size != f.size:
        return f"size mismatch (expected {f.size} bytes, found {size}; truncated or a different file)"
    if f.sha256 is not None:
        digest = sha256_file(p)
        if digest != f.sha256:
            return f"sha256 mismatch (expected {f.sha256[:12]}..., found {digest[:12]}...; corrupted or tampered)"
    elif p.suffix == ".safetensors":
        try:
            check_safetensors_header(p, artifact_id=art.id)
        except UnsafeWeightsError as e:
            return e.reason
    return None


def _check_location(art: Artifact, root: Path, files: dict[str, Path] | None = None) -> tuple[bool, str]:
    """Check every file of ``art`` under ``root`` (or at the explicit per-file paths). Returns (ok, outcome)."""
    problems = []
    for f in art.files:
        p = files[f.path] if files is not None else root / f.path
        why = _check_file(art, f, p)
        if why is not None:
            problems.append(f"{f.path}: {why}")
    if not problems:
        problems = _missing_component_weights(art, root)
        if not problems:
            return True, "ok"
        return False, "incomplete: " + "; ".join(problems)
    if all(pr.endswith(": missing") for pr in problems):
        return False, "missing" if len(problems) == 1 else f"missing ({len(problems)} files)"
    return False, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")


def _lists_only_configs(art: Artifact) -> bool:
    """An external pipeline folder whose entry lists the config files only (upstream hashes unknown)."""
    return art.status == "external" and art.kind == "diffusers-pipeline"


def _missing_component_weights(art: Artifact, root: Path) -> list[str]:
    """For an entry that lists only a pipeline's config files: every listed component folder with a ``config.json``
    must also hold its weights, as safetensors (every shard its ``*.safetensors.index.json`` names), or a snapshot
    with the configs alone would pass as complete. Nothing to check for entries that list their weights."""
    if not _lists_only_configs(art):
        return []
    out = []
    for f in art.files:
        parts = Path(f.path).parts
        if len(parts) != 2 or parts[1] != "config.json":
            continue
        comp = root / parts[0]
        index = sorted(comp.glob("*.safetensors.index.json"))
        if index:
            try:
                shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                out.append(f"{parts[0]}/{index[0].name}: unreadable")
                continue
            missing = [sh for sh in shards if not (comp / sh).is_file()]
            if missing:
                out.append(f"{parts[0]}/: {len(missing)} of {len(shards)} weight shards missing ({missing[0]}, ...)")
        elif not any(comp.glob("*.safetensors")):
            out.append(f"{parts[0]}/: no .safetensors weights")
    return out


def _is_verified(art: Artifact) -> bool:
    return all(f.sha256 is not None for f in art.files)


def _candidates_in_dir(art: Artifact, d: Path) -> list[Path]:
    """Roots under a search folder that may hold the artifact."""
    cands = [d / art.id]
    if not art.is_folder:
        cands.append(d)  # a single file dropped straight into the folder
    return cands


def _single_file_root(art: Artifact, p: Path) -> tuple[Path, dict[str, Path]]:
    f = art.main_file
    if p.is_file():
        return p.parent, {f.path: p}
    for cand in (p / f.path, p / Path(f.path).name):
        if cand.is_file():
            return p, {f.path: cand}
    return p, {f.path: p / f.path}


def _hint(art: Artifact, allow: bool, first_dir: Path | None) -> str:
    where = first_dir / art.id if first_dir else Path("<folder in EDITSTEER_WEIGHTS_DIR>") / art.id
    put = f"put the file(s) in {where}/ (relative paths as listed in weights_manifest/{art.id}.json)"
    if art.status == "unpublished":
        how = f"produce it with `{art.produced_by}`, or " if art.produced_by else ""
        return f"this artifact is not published on the Hub; {how}{put}"
    if hub_offline():
        return (f"run with HF_HUB_OFFLINE unset and {ENV_ALLOW_DOWNLOAD}=1 to download it from "
                f"{art.repo_id}@{art.revision or 'main'}, or {put}")
    if not allow:
        return (f"set {ENV_ALLOW_DOWNLOAD}=1 (or pass allow_download=True) to download it from "
                f"{art.repo_id}@{art.revision or 'main'}, or {put}")
    return f"check your connection and access to {art.repo_id}, or {put}"


def resolve(
    artifact: str | Artifact,
    *,
    path: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    hf_cache_dir: str | os.PathLike | None = None,
    use_bundled: bool = True,
    manifest_dir: str | os.PathLike | None = None,
) -> ResolvedArtifact:
    """Find a complete, verified copy of ``artifact`` (an id from ``weights_manifest/`` or an :class:`Artifact`).

    Example::

        from diffusers_ext.weights import resolve
        found = resolve("toy-kontext-editor")          # bundled copy, verified
        print(found.source, found.path)
    """
    art = artifact if isinstance(artifact, Artifact) else get_artifact(artifact, manifest_dir)
    searched: list[SearchedLocation] = []
    allow = downloads_allowed(allow_download)

    def hit(root: Path, source: str, files: dict[str, Path] | None = None) -> ResolvedArtifact:
        if not art.is_folder:
            p = files[art.main_file.path] if files else root / art.main_file.path
        else:
            p = root
        verified = _is_verified(art)
        if not verified:
            logger.warning("Weights '%s' at %s have no known sha256 in the manifest; loaded unverified.", art.id, p)
        searched.append(SearchedLocation(source, str(p), "ok"))
        return ResolvedArtifact(art, p, source, verified, searched)

    # 1. explicit path: the caller asked for exactly this; a bad copy is an error.
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            searched.append(SearchedLocation("explicit path", str(p), "does not exist"))
            raise WeightsError("the explicit path does not exist", artifact_id=art.id, repo_id=art.repo_id,
                               filename=art.main_file.path, searched=searched,
                               hint="pass the file or the folder that holds the artifact's files")
        if not art.is_folder:
            root, files = _single_file_root(art, p)
            ok, outcome = _check_location(art, root, files)
        else:
            root, files = p, None
            ok, outcome = _check_location(art, p)
            if not ok and (p / art.id).is_dir():
                root = p / art.id
                ok, outcome = _check_location(art, root)
        if ok:
            return hit(root, "explicit path", files)
        searched.append(SearchedLocation("explicit path", str(p), outcome))
        raise WeightsError("the file(s) at the explicit path do not match the manifest" if not outcome.startswith("missing")
                           else "the explicit path does not hold the artifact's files",
                           artifact_id=art.id, repo_id=art.repo_id, filename=art.main_file.path, searched=searched,
                           hint="delete the bad file and fetch it again, or pass the right path")

    # 2-4. registered local folders, bundled copy, Hugging Face cache (local files only)
    dirs = search_dirs()
    for label, root, files, where in _local_candidates(art, hf_cache_dir, use_bundled):
        ok, outcome = _check_location(art, root, files)
        if ok:
            return hit(root, label, files)
        if not outcome.startswith("missing"):  # absent everywhere is normal; a present-but-bad copy is worth a word
            logger.warning("Weights '%s' at %s are not valid (%s); they will not be loaded.", art.id, where, outcome)
        searched.append(SearchedLocation(label, where, outcome))

    if art.repo_id:
        from huggingface_hub import constants

        cache = Path(hf_cache_dir) if hf_cache_dir else Path(constants.HF_HUB_CACHE)
        rev = art.revision or "main"
        # 5. Hub download, only when allowed
        if art.status == "unpublished":
            searched.append(SearchedLocation("hub", art.repo_id, "skipped: not published on the Hub"))
        elif not allow:
            reason = "HF_HUB_OFFLINE is set" if hub_offline() else f"downloads not allowed ({ENV_ALLOW_DOWNLOAD} unset)"
            searched.append(SearchedLocation("hub", f"{art.repo_id}@{rev}", f"skipped: {reason}"))
        else:
            try:
                return _download(art, cache, searched, hit)
            except WeightsError:
                raise
            except Exception as e:  # network, auth, missing file on the Hub
                searched.append(SearchedLocation("hub", f"{art.repo_id}@{rev}", f"download failed: {e}"))

    first_dir = dirs[0][1] if dirs else None
    raise WeightsError("no valid copy found", artifact_id=art.id, repo_id=art.repo_id, filename=art.main_file.path,
                       searched=searched, hint=_hint(art, allow, first_dir))


def _local_candidates(art: Artifact, hf_cache_dir=None, use_bundled: bool = True):
    """Yield (label, root, per-file paths or None, description) for every local location, in search order."""
    for label, d in search_dirs():
        for root in _candidates_in_dir(art, d):
            files = None
            if not art.is_folder:
                root, files = _single_file_root(art, root)
            yield label, root, files, str(root)
    if use_bundled and art.bundled_path:
        root = assets_dir() / art.bundled_path
        yield "bundled", root, None, str(root)
    if art.repo_id:
        from huggingface_hub import constants, try_to_load_from_cache

        cache = Path(hf_cache_dir) if hf_cache_dir else Path(constants.HF_HUB_CACHE)
        rev = art.revision or "main"
        files: dict[str, Path] = {}
        for f in art.files:
            fn = f"{art.subfolder}/{f.path}" if art.subfolder else f.path
            got = try_to_load_from_cache(art.repo_id, fn, cache_dir=str(cache), revision=rev)
            files[f.path] = Path(got) if isinstance(got, str) else cache / "<not cached>" / fn
        yield "hf cache", _common_root(art, files), files, f"{cache} ({art.repo_id}@{rev})"


def survey(artifact: str | Artifact, *, hf_cache_dir=None, manifest_dir=None) -> list[SearchedLocation]:
    """Check every local location (not only the first good one); used by ``editsteer weights verify``."""
    art = artifact if isinstance(artifact, Artifact) else get_artifact(artifact, manifest_dir)
    out = []
    for label, root, files, where in _local_candidates(art, hf_cache_dir):
        ok, outcome = _check_location(art, root, files)
        out.append(SearchedLocation(label, where if not ok else str(files[art.main_file.path] if files and not art.is_folder else root), outcome))
    return out


def _common_root(art: Artifact, files: dict[str, Path]) -> Path:
    """The folder that holds the artifact's files in an HF snapshot."""
    f = art.main_file
    p = files[f.path]
    depth = len(Path(f.path).parts)
    return p.parents[depth - 1] if depth >= 1 else p.parent


def _download(art: Artifact, cache: Path, searched, hit) -> ResolvedArtifact:
    """Download every file at the pinned revision into the HF cache, verify, and delete any bad download.

    Only reached when no good copy is in the cache, so files are fetched again (``force_download``) rather than taken
    from a cached copy already found bad. An entry listing only a pipeline's configs (external) downloads the
    snapshot's configs, tokenizer files and safetensors weights (no pickles)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    files: dict[str, Path] = {}
    if _lists_only_configs(art):
        pre = f"{art.subfolder}/" if art.subfolder else ""
        got = Path(snapshot_download(art.repo_id, revision=art.revision, cache_dir=str(cache), force_download=True,
                                     allow_patterns=[f"{pre}{p}" for p in ("*.json", "*/*.json", "*/*.safetensors",
                                                                            "*/*.txt", "*/*.model")]))
        root = got / art.subfolder if art.subfolder else got
        files = {f.path: root / f.path for f in art.files}
    else:
        for f in art.files:
            got = hf_hub_download(art.repo_id, f.path, subfolder=art.subfolder, revision=art.revision,
                                  cache_dir=str(cache), force_download=True)
            files[f.path] = Path(got)
    root = _common_root(art, files)
    ok, outcome = _check_location(art, root, files)
    if ok:
        return hit(root, "hub", files)
    for p in files.values():  # never leave a download that could later be mistaken for a good copy
        blob = p.resolve()
        for q in (p, blob):
            try:
                q.unlink()
            except OSError:
                pass
    searched.append(SearchedLocation("hub", f"{art.repo_id}@{art.revision}", f"downloaded, then rejected: {outcome}"))
    raise WeightsError("the downloaded file(s) do not match the manifest (deleted them)", artifact_id=art.id,
                       repo_id=art.repo_id, filename=art.main_file.path, searched=searched,
                       hint="the files just downloaded from the Hub do not match the manifest's entry for this "
                            "revision; report this, or update the manifest")


def load_state_dict(artifact: str | Artifact, device: str = "cpu", **resolve_kwargs):
    """Resolve a single-file artifact and load its tensors (safetensors only)."""
    found = resolve(artifact, **resolve_kwargs)
    return load_safetensors(found.file(), device=device, artifact_id=found.artifact.id)

"""The weights manifest: one small JSON file per weight artifact in ``weights_manifest/``.

An entry names where an artifact lives on the Hugging Face Hub (repo id, pinned revision, files), what it is (kind,
base model family, license, purpose), whether it is actually published (``status``), and the sha256 and size of
every file, so that any copy found on disk can be verified before it is loaded.

Statuses:

``published``
    The files exist on the Hub at ``repo_id`` and the 40-hex ``revision``; the resolver may download them.
``unpublished``
    Not on the Hub (yet). ``repo_id`` is the destination of ``editsteer weights publish``. The pack may bundle a
    copy (``bundled_path``) or the user produces it with a training command (``produced_by``).
``external``
    A third-party checkpoint (a base model) the pack loads but does not own. Its files may carry no sha256 when the
    upstream hash is not known; such files are loaded with a warning and reported as unverifiable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import EditSteerConfigError

STATUSES = ("published", "unpublished", "external")
KINDS = ("safetensors", "diffusers-pipeline", "diffusers-model", "folder")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the artifact root (and to the repo's subfolder on the Hub)
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class Artifact:
    id: str
    description: str
    kind: str
    base_model: str  # model family, e.g. "flux-kontext", "qwen-image-edit", "switti", "wan2.1"
    license: str
    status: str
    repo_id: str | None
    files: tuple[ArtifactFile, ...]
    revision: str | None = None
    subfolder: str | None = None
    bundled_path: str | None = None  # relative to diffusers_ext/assets/
    produced_by: str | None = None  # the command that produces it
    extra: dict = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        """Folder artifacts resolve to a directory (e.g. a pipeline for ``from_pretrained``); others to one file."""
        return self.kind != "safetensors"

    @property
    def main_file(self) -> ArtifactFile:
        return self.files[0]

    def to_json(self) -> dict:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return {k: v for k, v in d.items() if v not in (None, {}, "")}

    @classmethod
    def from_json(cls, d: dict, *, source: str = "<dict>") -> "Artifact":
        d = dict(d)
        try:
            files = tuple(ArtifactFile(f["path"], f.get("sha256"), f.get("size")) for f in d.pop("files"))
            art = cls(files=files, **d)
        except (KeyError, TypeError) as e:
            raise EditSteerConfigError(f"manifest entry {source} is malformed: {e}") from None
        art.validate(source)
        return art

    def validate(self, source: str = "<entry>") -> None:
        def bad(msg: str):
            raise EditSteerConfigError(f"manifest entry {source} ('{self.id}'): {msg}")

        if not _ID.match(self.id):
            bad("id must be lowercase letters, digits, '.', '_' or '-'")
        if self.status not in STATUSES:
            bad(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.kind not in KINDS:
            bad(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.files:
            bad("lists no files")
        if self.kind == "safetensors" and (len(self.files) != 1 or not self.files[0].path.endswith(".safetensors")):
            bad("a 'safetensors' artifact has exactly one .safetensors file")
        if self.status == "published":
            if not self.repo_id:
                bad("a published artifact needs repo_id")
            if not (self.revision and _HEX40.match(self.revision)):
                bad("a published artifact needs a pinned 40-hex revision (a commit on the Hub)")
        if self.status == "unpublished" and self.revision:
            bad("an unpublished artifact cannot name a Hub revision")
        for f in self.files:
            if f.path.startswith("/") or ".." in Path(f.path).parts:
                bad(f"file path {f.path!r} must be relative and inside the artifact")
            if f.sha256 is None or f.size is None:
                if self.status != "external":
                    bad(f"file {f.path!r} needs sha256 and size (only 'external' artifacts may omit them)")
            elif not _HEX64.match(f.sha256):
                bad(f"file {f.path!r} has a malformed sha256")


def default_manifest_dir() -> Path:
    """``EDITSTEER_MANIFEST_DIR`` if set, else ``weights_manifest/`` of the checkout, else the copy packaged as
    ``diffusers_ext/weights_manifest`` (wheel installs)."""
    env = os.environ.get("EDITSTEER_MANIFEST_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "weights_manifest"
    if checkout.is_dir():
        return checkout
    packaged = Path(__file__).resolve().parents[1] / "weights_manifest"
    return packaged


def assets_dir() -> Path:
    """Where bundled (committed) weights live: ``diffusers_ext/assets/``."""
    return Path(__file__).resolve().parents[1] / "assets"


@lru_cache(maxsize=8)
def _load_dir(path: str) -> dict[str, Artifact]:
    out: dict[str, Artifact] = {}
    for f in sorted(Path(path).glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise EditSteerConfigError(f"manifest file {f} is not valid JSON: {e}") from None
        art = Artifact.from_json(data, source=str(f))
        if art.id != f.stem:
            raise EditSteerConfigError(f"manifest file {f} holds id '{art.id}'; the file must be named '{art.id}.json'")
        out[art.id] = art
    return out


def load_manifest(directory: str | Path | None = None) -> dict[str, Artifact]:
    """All artifacts of a manifest folder, keyed by id (sorted)."""
    return dict(_load_dir(str(Path(directory) if directory else default_manifest_dir())))


def get_artifact(artifact_id: str, directory: str | Path | None = None) -> Artifact:
    arts = load_manifest(directory)
    if artifact_id not in arts:
        known = ", ".join(arts) or "(none)"
        raise EditSteerConfigError(f"unknown weight artifact '{artifact_id}'. Known artifacts: {known}. "
                                   "`editsteer weights list` shows them.")
    return arts[artifact_id]


def clear_manifest_cache() -> None:
    _load_dir.cache_clear()


def entry_from_folder(folder: str | Path, *, id: str, description: str, kind: str, base_model: str, license: str,
                      status: str = "unpublished", repo_id: str | None = None, revision: str | None = None,
                      subfolder: str | None = None, bundled_path: str | None = None, produced_by: str | None = None,
                      include: tuple[str, ...] = ("*",), extra: dict | None = None) -> Artifact:
    """Build a manifest entry from files on disk (hashes every file). Used after training to register weights."""
    from .safetensors_io import sha256_file

    root = Path(folder)
    paths = sorted({p for pat in include for p in root.rglob(pat) if p.is_file()})
    paths = [p for p in paths if not p.name.startswith(".") and "__pycache__" not in p.parts]
    files = tuple(ArtifactFile(p.relative_to(root).as_posix(), sha256_file(p, use_cache=False), p.stat().st_size)
                  for p in paths)
    art = Artifact(id=id, description=description, kind=kind, base_model=base_model, license=license,
                   status=status, repo_id=repo_id, files=files, revision=revision, subfolder=subfolder,
                   bundled_path=bundled_path, produced_by=produced_by, extra=dict(extra or {}))
    art.validate()
    return art


def write_entry(art: Artifact, directory: str | Path | None = None) -> Path:
    directory = Path(directory) if directory else default_manifest_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{art.id}.json"
    path.write_text(json.dumps(art.to_json(), indent=2) + "\n")
    clear_manifest_cache()
    return path

"""Weight artifacts: the manifest, the local-first resolver, and safetensors-only loading."""

from .hub_keys import hub_key_layout
from .manifest import Artifact, ArtifactFile, entry_from_folder, get_artifact, load_manifest, write_entry
from .resolver import (
    ResolvedArtifact,
    downloads_allowed,
    load_state_dict,
    register_search_dir,
    resolve,
    search_dirs,
    unregister_search_dir,
)
from .safetensors_io import load_safetensors, read_safetensors_metadata, save_safetensors, sha256_file

__all__ = [
    "Artifact",
    "ArtifactFile",
    "ResolvedArtifact",
    "downloads_allowed",
    "entry_from_folder",
    "get_artifact",
    "hub_key_layout",
    "load_manifest",
    "load_safetensors",
    "load_state_dict",
    "read_safetensors_metadata",
    "register_search_dir",
    "resolve",
    "save_safetensors",
    "search_dirs",
    "sha256_file",
    "unregister_search_dir",
    "write_entry",
]

"""ComfyUI model folders of the pack, registered with ComfyUI and with the diffusers_ext weight resolver."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("EditSteer")

FOLDER_KEY = "editsteer"  # ComfyUI/models/editsteer/<artifact id>/...


def register_model_folders() -> list[str]:
    """Register ``models/editsteer`` with ComfyUI's ``folder_paths`` and the resolver; return the folders."""
    import folder_paths

    from diffusers_ext.weights import register_search_dir

    default = os.path.join(folder_paths.models_dir, FOLDER_KEY)
    if FOLDER_KEY not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER_KEY, default)
    try:
        dirs = list(folder_paths.get_folder_paths(FOLDER_KEY))
    except Exception:  # pragma: no cover - very old folder_paths
        dirs = [default]
    for d in dirs:
        register_search_dir(d, label="comfyui models")
    return dirs

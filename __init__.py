"""EditSteer as a ComfyUI custom node pack.

Clone this repository into ``ComfyUI/custom_nodes/`` (and ``pip install -e .`` it, or its requirements, into
ComfyUI's Python). ComfyUI imports this file; it exposes the V3 ``comfy_entrypoint`` only when ComfyUI is
importable, so importing the repository anywhere else does nothing.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None:
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:  # a plain clone: make diffusers_ext importable; appended, so that nothing of this
        sys.path.append(_here)  # folder shadows another pack's modules
    # Relative: ComfyUI loads this folder as a package, so the nodes are <this package>.comfy_nodes and never take
    # the top-level name comfy_nodes, which other packs use for their own.
    from .comfy_nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]

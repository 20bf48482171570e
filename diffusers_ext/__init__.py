"""EditSteer's library: instruction-based image editing methods on top of diffusers.

Nothing here imports ComfyUI. Heavy submodules (pipelines, training) are imported on first use::

    import diffusers_ext
    diffusers_ext.weights.resolve("toy-kontext-editor")
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import EditSteerConfigError, EditSteerError, ModelFamilyError, WeightsError

_SUBMODULES = ("weights", "toy", "bench", "critic", "verilatent", "mln", "switti", "anchoredit", "tiny", "shims",
               "cli")

__all__ = ["EditSteerConfigError", "EditSteerError", "ModelFamilyError", "WeightsError", "__version__",
           *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

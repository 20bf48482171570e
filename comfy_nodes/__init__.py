"""ComfyUI V3 nodes of EditSteer: thin glue over ``diffusers_ext`` (the only package that imports ComfyUI).

Node families live in ``nodes_<family>.py`` modules, each exposing ``NODES`` (a list of ``io.ComfyNode``
classes). A family whose module fails to import is skipped with a logged warning, so one broken optional
dependency never takes the whole pack down.
"""

from __future__ import annotations

import importlib
import logging

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .paths import register_model_folders

logger = logging.getLogger("EditSteer")

NODE_MODULES = ("nodes_toy", "nodes_critic", "nodes_verilatent", "nodes_mln", "nodes_anchoredit")


def load_node_classes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # family not part of this build
            logger.warning("EditSteer: skipping %s (%s)", name, e, exc_info=True)
            continue
        except Exception as e:  # keep the rest of the pack usable
            logger.warning("EditSteer: skipping %s (%s)", name, e, exc_info=True)
            continue
        nodes.extend(getattr(mod, "NODES", []))
    return nodes


class EditSteerExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        register_model_folders()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folders()  # older ComfyUI releases do not call on_load
        return load_node_classes()


async def comfy_entrypoint() -> EditSteerExtension:
    return EditSteerExtension()

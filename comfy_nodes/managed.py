"""EditSteer's own diffusers pipelines under ComfyUI's model management.

ComfyUI moves models on and off the GPU through the ``ModelPatcher`` objects listed in
``comfy.model_management.current_loaded_models``: before a node runs a model it calls ``load_models_gpu``, which
evicts other models when memory is short, and the "free model memory" button or the ``/free`` API unloads them all.
A pipeline moved to the GPU by hand is invisible to all of that: ComfyUI cannot evict it to make room for the next
model in a workflow, and it stays on the GPU until its node's output leaves the cache.

:class:`ManagedPipeline` puts a pipeline's torch modules under one ``ModelPatcher`` and loads them before every
run. The modules are plain torch layers, not ``comfy.ops`` ones, so they cannot run partly offloaded: loads are full
(``force_full_load``). When ComfyUI frees memory it may unload a part of them (``partially_unload`` moves whole
layers to the offload device); the next :meth:`ManagedPipeline.load` brings every layer back.
"""

from __future__ import annotations

import torch


class PipelineModules(torch.nn.Module):
    """The torch modules of a diffusers pipeline, registered under their component names. ``ModelPatcher`` writes
    ``device`` and bookkeeping attributes on the module it manages, which a diffusers ``ModelMixin`` (a read-only
    ``device``) would refuse, so the patcher gets this plain container; the pipeline keeps using the same modules.

    Use :meth:`of`: it names the container's class after the pipeline's, which is the name ComfyUI's log shows
    ("Requested to load MLNPipeline")."""

    _named: dict[str, type] = {}

    def __init__(self, pipe):
        super().__init__()
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                self.add_module(name, component)

    @classmethod
    def of(cls, pipe) -> "PipelineModules":
        name = type(pipe).__name__
        if name not in cls._named:
            cls._named[name] = type(name, (cls,), {"__module__": __name__, "__doc__": cls.__doc__})
        return cls._named[name](pipe)


class ManagedPipeline:
    """A pipeline plus the ``ModelPatcher`` through which ComfyUI manages its memory.

    ``working_memory`` (bytes) is what a run needs beyond the weights; ComfyUI frees that much besides (plus its own
    reserve) before loading. Build it with the pipeline on ``offload_device``: ComfyUI moves it on first use.
    """

    def __init__(self, pipe, load_device: torch.device, offload_device: torch.device, working_memory: int = 0):
        import comfy.model_patcher

        self.pipe = pipe
        self.working_memory = int(working_memory)
        self.patcher = comfy.model_patcher.ModelPatcher(PipelineModules.of(pipe), load_device=load_device,
                                                        offload_device=offload_device)

    def load(self):
        """The pipeline with every module on ComfyUI's device, evicting other models if memory is short."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], memory_required=self.working_memory, force_full_load=True)
        return self.pipe

    def __repr__(self) -> str:
        return f"ManagedPipeline({type(self.pipe).__name__}, load_device={self.patcher.load_device})"

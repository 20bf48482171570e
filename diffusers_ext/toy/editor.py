"""The toy editor: a ``FluxKontextPipeline`` of tiny real components trained on the toy world.

Its folder is a normal diffusers pipeline folder plus ``editsteer_toy.json``, which holds the call settings the toy
model was trained for (32x32 images, a short T5 context, its step count). Everything that runs the toy editor
(the CLI, the benchmarks, the methods' tests) goes through :func:`toy_pipeline_kwargs`, so those settings live in
one place.

Example::

    from diffusers_ext.toy import world
    from diffusers_ext.toy.editor import load_toy_editor, toy_edit
    pipe, where = load_toy_editor()                      # bundled weights, verified, offline
    case = world.make_case("heldout", seed=0, index=0)
    result = toy_edit(pipe, case.source, case.instruction, seed=0)
    result.image.shape                                   # (32, 32, 3) uint8
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world as W

TOY_EDITOR_ID = "toy-kontext-editor"
SETTINGS_FILE = "editsteer_toy.json"
DEFAULT_SETTINGS = {
    "height": W.IMAGE_SIZE,
    "width": W.IMAGE_SIZE,
    "max_sequence_length": 16,
    "num_inference_steps": 8,
    "guidance_scale": 1.0,
    "true_cfg_scale": 1.0,
}


@dataclass
class ToyEditResult:
    image: np.ndarray  # uint8 HxWx3 (or NxHxWx3 for a batch)
    nfe: int


def read_settings(folder: str | Path) -> dict:
    p = Path(folder) / SETTINGS_FILE
    settings = dict(DEFAULT_SETTINGS)
    if p.is_file():
        settings.update(json.loads(p.read_text()))
    return settings


def write_settings(folder: str | Path, **overrides) -> Path:
    p = Path(folder) / SETTINGS_FILE
    p.write_text(json.dumps({**DEFAULT_SETTINGS, **overrides}, indent=2) + "\n")
    return p


def load_toy_editor(model: str | Path | None = None, *, device: str = "cpu", dtype=None, pipeline_cls=None):
    """Load the toy editor (a manifest id, default the bundled one, or a pipeline folder); return (pipe, where).

    ``pipeline_cls`` lets a method load the same weights into its own ``FluxKontextPipeline`` subclass.
    """
    import torch
    from diffusers import FluxKontextPipeline

    from ..weights import resolve

    model = model or TOY_EDITOR_ID
    p = Path(model)
    if p.is_dir():
        folder, where = p, f"folder {p}"
    else:
        found = resolve(str(model))
        folder, where = found.path, f"{found.source}: {found.path}"
    cls = pipeline_cls or FluxKontextPipeline
    pipe = cls.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe._editsteer_toy_settings = read_settings(folder)
    return pipe.to(device), where


def toy_pipeline_kwargs(pipe, **overrides) -> dict:
    """Keyword arguments for ``pipe(...)`` that match how the toy editor was trained (size, context, steps)."""
    s = dict(getattr(pipe, "_editsteer_toy_settings", None) or DEFAULT_SETTINGS)
    kw = {
        "height": s["height"],
        "width": s["width"],
        "max_area": s["height"] * s["width"],
        "_auto_resize": False,
        "max_sequence_length": s["max_sequence_length"],
        "num_inference_steps": s["num_inference_steps"],
        "guidance_scale": s["guidance_scale"],
    }
    if s.get("true_cfg_scale", 1.0) > 1.0:
        kw["true_cfg_scale"] = s["true_cfg_scale"]
        kw["negative_prompt"] = s.get("negative_prompt", "")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def nfe_of(kwargs: dict) -> int:
    """Transformer forward passes of one call (true CFG runs a second pass per step)."""
    passes = 2 if kwargs.get("true_cfg_scale", 1.0) > 1.0 and kwargs.get("negative_prompt") is not None else 1
    return int(kwargs["num_inference_steps"]) * passes


def toy_edit(pipe, image, instruction, *, steps: int | None = None, seed: int = 0, generator=None,
             **overrides) -> ToyEditResult:
    """Edit one image (uint8 HxWx3) or a batch (list / NxHxWx3 with a list of instructions)."""
    import torch

    batch = isinstance(instruction, (list, tuple))
    images = list(image) if batch else [image]
    prompts = list(instruction) if batch else [instruction]
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} instructions")
    kw = toy_pipeline_kwargs(pipe, num_inference_steps=steps, **overrides)
    if generator is None:
        generator = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(image=[W.to_pil(np.asarray(im)) for im in images], prompt=prompts, generator=generator,
               output_type="np", **kw).images
    imgs = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    return ToyEditResult(image=imgs if batch else imgs[0], nfe=nfe_of(kw) * len(prompts))

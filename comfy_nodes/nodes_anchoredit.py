"""AnchorEdit in ComfyUI: an editing session passed from node to node, one node per turn.

``EDITSTEER_ANCHOREDIT_MODEL`` (an :class:`~diffusers_ext.anchoredit.AnchorEditPipeline`) and
``EDITSTEER_ANCHOREDIT_SESSION`` (an :class:`~diffusers_ext.anchoredit.AnchorEditSession`) are pack-private socket
types. A turn node never changes the turns of the session it receives (ComfyUI may reuse a cached output when you
change a later turn): it edits a fork, so chained turns behave like a branching history. The fork takes the input
session's KV cache instead of copying it (``fork(take_cache=True)``): ComfyUI keeps every node's output alive, and
a chain of N turns would otherwise hold N + 1 caches (several GiB each at full size); an input session that is used
again rebuilds its cache from its kept latents (one transformer pass per frame). Sampling reports progress per
denoising step with a preview, and honours ComfyUI's interrupt between steps; an interrupted turn leaves nothing
half-done.

All the method's work happens in ``diffusers_ext.anchoredit``; this module only converts types.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

logger = logging.getLogger("EditSteer")

CATEGORY = "EditSteer/AnchorEdit"
AnchorEditModel = io.Custom("EDITSTEER_ANCHOREDIT_MODEL")
AnchorEditSessionType = io.Custom("EDITSTEER_ANCHOREDIT_SESSION")
TOY_ID = "toy-anchoredit"
SESSION_DIR = "editsteer_sessions"
_MODELS: dict[tuple, object] = {}  # (source, device) -> ManagedPipeline: load once per ComfyUI process


def _model_choices() -> list[str]:
    """The bundled toy model plus every AnchorEdit/Wan pipeline folder under models/editsteer/."""
    out = [TOY_ID]
    try:
        import folder_paths

        for d in folder_paths.get_folder_paths("editsteer"):
            for mi in sorted(Path(d).glob("*/model_index.json")):
                try:
                    cls = json.loads(mi.read_text()).get("_class_name")
                except (OSError, json.JSONDecodeError):
                    continue
                if cls in ("AnchorEditPipeline", "WanPipeline") and mi.parent.name not in out:
                    out.append(mi.parent.name)
    except Exception:  # pragma: no cover - folder_paths always exists inside ComfyUI
        logger.debug("EditSteer: could not list models/editsteer", exc_info=True)
    return out


def load_model(name: str):
    """The pipeline for a model choice (an artifact id, or a folder name under models/editsteer/), loaded once per
    ComfyUI process on ComfyUI's offload device (bf16 when ComfyUI's device is a GPU) and managed by ComfyUI like
    its own models (:class:`~comfy_nodes.managed.ManagedPipeline`); the nodes load it with :func:`_ready`."""
    import comfy.model_management as mm

    from .managed import ManagedPipeline

    source = name
    try:
        import folder_paths

        for d in folder_paths.get_folder_paths("editsteer"):
            if (Path(d) / name / "model_index.json").is_file():
                source = str(Path(d) / name)
                break
    except Exception:  # pragma: no cover
        pass
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    key = (source, str(device))
    if key not in _MODELS:
        _MODELS[key] = ManagedPipeline(_load_pipeline(source, device, offload), device, offload)
    return _MODELS[key].pipe


def _load_pipeline(source: str, device: torch.device, offload: torch.device):
    """The pipeline of ``source`` on ``offload``, in bf16 when it will run on a GPU. The dtype goes to
    ``from_pretrained``, which keeps diffusers' ``_keep_in_fp32_modules`` (RoPE, time embedder, modulation tables,
    norms) in float32 and never holds the weights in float32; casting with ``pipe.to(torch.bfloat16)`` would cast
    those too (an error that grows every turn)."""
    from diffusers_ext.anchoredit import AnchorEditPipeline

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    pipe = AnchorEditPipeline.from_toy(source, device="cpu", dtype=dtype)
    return pipe.to(offload)


def _ready(pipe):
    """``pipe`` with its weights on ComfyUI's device (ComfyUI may have offloaded them since the last node ran).
    Sessions keep their caches on that device, so every node that runs the model or makes a session calls this."""
    for managed in _MODELS.values():
        if managed.pipe is pipe:
            managed.load()
    return pipe


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """The first image of a ComfyUI IMAGE batch ([B, H, W, 3] in [0, 1]) as uint8 HxWx3."""
    if image.ndim == 4:
        if image.shape[0] > 1:
            logger.warning("EditSteer AnchorEdit: the image batch has %d images; using the first", image.shape[0])
        image = image[0]
    return (image[..., :3].float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def _to_image(arrays) -> torch.Tensor:
    """uint8 HxWx3 (or a list of them) -> ComfyUI IMAGE [B, H, W, 3] float in [0, 1]."""
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def _progress_callback(pipe, node_id, preview: bool):
    import comfy.model_management as mm
    import comfy.utils

    bar = None

    def callback(step, total, x0):
        nonlocal bar
        mm.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total, node_id=node_id)
        shown = None
        if preview:
            from PIL import Image

            shown = ("JPEG", Image.fromarray(pipe.decode_latents(x0)[0]), 512)
        bar.update_absolute(step + 1, total, shown)

    return callback


def _sampler(pipe, sampler: str, flow_steps: int):
    from diffusers_ext.anchoredit import SamplerConfig

    if sampler == "distilled (4 steps)":
        return SamplerConfig.distilled()
    if sampler == "flow":
        base = pipe.sampler_config
        g = base.guidance_scale if base.kind == "flow" else 1.0
        return SamplerConfig.flow(steps=flow_steps, shift=base.shift, guidance_scale=g)
    return pipe.sampler_config


class EditSteerAnchorEditModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditModel", display_name="AnchorEdit Model", category=CATEGORY,
            description="Load an AnchorEdit model (a causal Wan editor): the bundled toy model, or a pipeline folder "
                        "in models/editsteer/. Loaded once per ComfyUI process.",
            inputs=[io.Combo.Input("model", options=_model_choices(), default=TOY_ID,
                                   tooltip="toy-anchoredit (bundled, 32x32 toy world) or a folder under "
                                           "models/editsteer/ holding an AnchorEditPipeline")],
            outputs=[AnchorEditModel.Output(display_name="model")])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(load_model(model))


class EditSteerAnchorEditStart(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditStart", display_name="AnchorEdit Start Session", category=CATEGORY,
            description="Start a multi-turn editing session from a source image (frame 0: the anchor that stays in "
                        "memory for every later turn).",
            inputs=[
                AnchorEditModel.Input("model", tooltip="from AnchorEdit Model"),
                io.Image.Input("image", tooltip="the source image; its sides must be multiples of the model's grid "
                                                "(toy: 8, Wan: 16)"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="session seed: turn i uses seed + 7919 x i, so a session replays exactly"),
                io.Combo.Input("sampler", options=["model default", "distilled (4 steps)", "flow"],
                               default="model default",
                               tooltip="per-turn schedule: the model's own, the distilled 4-step schedule, or a "
                                       "many-step flow sampler (for undistilled weights)"),
                io.Int.Input("flow_steps", default=24, min=1, max=200,
                             tooltip="steps of the flow sampler (ignored by the other samplers)"),
            ],
            outputs=[AnchorEditSessionType.Output(display_name="session"), io.Image.Output(display_name="source")])

    @classmethod
    def execute(cls, model, image, seed, sampler, flow_steps) -> io.NodeOutput:
        sampler = _sampler(model, sampler, flow_steps)
        session = _ready(model).start_session(_to_uint8(image), seed=int(seed), sampler=sampler)
        return io.NodeOutput(session, _to_image(session.source))


class EditSteerAnchorEditTurn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditTurn", display_name="AnchorEdit Turn", category=CATEGORY,
            description="One editing turn: apply an instruction to the session's current image. Chain one node per "
                      "turn; the input session is left unchanged (the output is a new session one turn longer).",
            inputs=[
                AnchorEditSessionType.Input("session", tooltip="from AnchorEdit Start Session or a previous turn"),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="what to change in the current image (empty: keep it)"),
                io.Int.Input("seed", default=-1, min=-1, max=2**31 - 1,
                             tooltip="-1: the session's per-turn seed (seed + 7919 x turn); else this turn's seed"),
                io.Boolean.Input("preview", default=True, tooltip="decode a preview after every denoising step"),
            ],
            outputs=[AnchorEditSessionType.Output(display_name="session"), io.Image.Output(display_name="image"),
                     io.Int.Output(display_name="turn")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, session, instruction, seed, preview) -> io.NodeOutput:
        _ready(session.pipe)  # the model runs: this turn, and rebuilding the cache if the input gave it away
        new = session.fork(take_cache=True)
        cb = _progress_callback(new.pipe, cls.hidden.unique_id if cls.hidden else None, bool(preview))
        img = new.edit(instruction, seed=None if int(seed) < 0 else int(seed), output_type="np", callback=cb)
        return io.NodeOutput(new, _to_image(img), new.turns)


class EditSteerAnchorEditUndo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditUndo", display_name="AnchorEdit Undo", category=CATEGORY,
            description="Drop the last turns of a session (the input session is left unchanged).",
            inputs=[AnchorEditSessionType.Input("session", tooltip="the session to step back in"),
                    io.Int.Input("turns", default=1, min=1, max=256, tooltip="how many turns to drop")],
            outputs=[AnchorEditSessionType.Output(display_name="session"), io.Image.Output(display_name="image")])

    @classmethod
    def execute(cls, session, turns) -> io.NodeOutput:
        _ready(session.pipe)
        new = session.fork(take_cache=True)
        img = new.undo(int(turns), output_type="np")
        return io.NodeOutput(new, _to_image(img))


class EditSteerAnchorEditHistory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditHistory", display_name="AnchorEdit History", category=CATEGORY,
            description="Every image of a session as a batch: the source, then one image per turn.",
            inputs=[AnchorEditSessionType.Input("session", tooltip="the session to show")],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="instructions")])

    @classmethod
    def execute(cls, session) -> io.NodeOutput:
        text = "\n".join(f"{t.turn}: {t.instruction}" for t in session.history)
        return io.NodeOutput(_to_image(session.images), text)


class EditSteerAnchorEditSaveSession(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditSaveSession", display_name="AnchorEdit Save Session", category=CATEGORY,
            description="Save a session (KV cache, latents, instructions, seeds) to ComfyUI's output folder as "
                        f"{SESSION_DIR}/NAME.safetensors + NAME.json, to continue it later.",
            inputs=[AnchorEditSessionType.Input("session", tooltip="the session to save"),
                    io.String.Input("filename_prefix", default="anchoredit",
                                    tooltip="file name prefix; a counter is appended"),
                    io.Boolean.Input("include_cache", default=True,
                                     tooltip="store the KV cache (instant resume; large for full-size Wan). "
                                             "Without it, loading recomputes it, one pass per turn")],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True)

    @classmethod
    def execute(cls, session, filename_prefix, include_cache) -> io.NodeOutput:
        import folder_paths

        root = Path(folder_paths.get_output_directory()) / SESSION_DIR
        root.mkdir(parents=True, exist_ok=True)
        prefix = "".join(c for c in filename_prefix if c.isalnum() or c in "-_") or "anchoredit"
        n = 1 + max((int(p.stem.rsplit("_", 1)[-1]) for p in root.glob(f"{prefix}_*.json")
                     if p.stem.rsplit("_", 1)[-1].isdigit()), default=0)
        if include_cache and not session.holds_cache:  # a later turn took it: rebuilt, with the model
            _ready(session.pipe)
        _, js = session.save(root / f"{prefix}_{n:05d}", include_cache=bool(include_cache))
        path = str(js.with_suffix(""))
        return io.NodeOutput(path, ui={"text": [path]})


class EditSteerAnchorEditLoadSession(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerAnchorEditLoadSession", display_name="AnchorEdit Load Session", category=CATEGORY,
            description="Continue a saved session. It must have been made with this model (refused otherwise).",
            inputs=[AnchorEditModel.Input("model", tooltip="the model the session was made with"),
                    io.String.Input("path", default="",
                                    tooltip=f"session path without extension; relative paths are read from the "
                                            f"output folder's {SESSION_DIR}/")],
            outputs=[AnchorEditSessionType.Output(display_name="session"), io.Image.Output(display_name="image")])

    @classmethod
    def fingerprint_inputs(cls, model, path):
        p = cls._resolve(path)
        js = p.with_name(p.name + ".json")
        return f"{path}:{js.stat().st_mtime_ns if js.is_file() else 0}"

    @staticmethod
    def _resolve(path: str) -> Path:
        p = Path(path.strip())
        if p.suffix in (".json", ".safetensors"):
            p = p.with_suffix("")
        if not p.is_absolute():
            import folder_paths

            p = Path(folder_paths.get_output_directory()) / SESSION_DIR / p
        return p

    @classmethod
    def execute(cls, model, path) -> io.NodeOutput:
        from diffusers_ext.anchoredit import AnchorEditSession

        session = AnchorEditSession.load(_ready(model), cls._resolve(path))
        return io.NodeOutput(session, _to_image(session.image))


NODES = [EditSteerAnchorEditModel, EditSteerAnchorEditStart, EditSteerAnchorEditTurn, EditSteerAnchorEditUndo,
         EditSteerAnchorEditHistory, EditSteerAnchorEditSaveSession, EditSteerAnchorEditLoadSession]

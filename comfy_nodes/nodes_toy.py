"""ComfyUI nodes of the toy editor: load it as MODEL + VAE + text encoder, encode toy instructions, make toy cases.

The MODEL is ComfyUI's own Flux class run by ComfyUI's samplers, so every built-in Kontext node works with it:
``ReferenceLatent`` for the source image, ``BasicGuider``/``CFGGuider``, ``KSampler``, ``SamplerCustomAdvanced``,
``VAEEncode``/``VAEDecode``. A whole edit runs on a CPU in a second (``workflows/editsteer_toy_edit.json``).
"""

from __future__ import annotations

import numpy as np
import torch

from comfy_api.latest import io

CATEGORY = "EditSteer/Toy"
ToyTextEncoder = io.Custom("EDITSTEER_TOY_TEXT_ENCODER")


def image_to_comfy(img: np.ndarray) -> torch.Tensor:
    """uint8 ``HxWx3`` -> ComfyUI IMAGE ``(1, H, W, 3)`` float in ``[0, 1]``."""
    return torch.tensor(img, dtype=torch.float32).div(255.0).unsqueeze(0)


class EditSteerToyEditorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerToyEditorLoader",
            display_name="Load Toy Editor (EditSteer)",
            category=CATEGORY,
            description="Load EditSteer's tiny FLUX.1-Kontext-class toy editor as a ComfyUI MODEL (run by "
                        "ComfyUI's own Flux model and samplers), a VAE and its text encoder. Looked up in "
                        "models/editsteer, then the bundled copy, then the Hugging Face cache; offline by default.",
            inputs=[
                io.String.Input("editor", default="toy-kontext-editor",
                                tooltip="A weights-manifest id (e.g. toy-kontext-editor), or the path of a "
                                        "diffusers FluxKontextPipeline folder of the same kind."),
                io.Boolean.Input("allow_download", default=False,
                                 tooltip="Allow a download from the Hugging Face Hub when no local copy exists "
                                         "(never needed for the bundled toy editor)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Vae.Output(display_name="vae"),
                ToyTextEncoder.Output(display_name="text_encoder"),
            ],
        )

    @classmethod
    def execute(cls, editor: str, allow_download: bool) -> io.NodeOutput:
        from .flux_toy import load_toy_for_comfy

        toy = load_toy_for_comfy(editor.strip() or "toy-kontext-editor", allow_download=allow_download)
        return io.NodeOutput(toy.model, toy.vae, toy.text_encoder)


class EditSteerToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerToyTextEncode",
            display_name="Toy Instruction Encode (EditSteer)",
            category=CATEGORY,
            description="Encode an edit instruction with the toy editor's CLIP and T5 encoders into Flux "
                        "CONDITIONING (T5 sequence + CLIP pooled), exactly as the diffusers pipeline does.",
            inputs=[
                ToyTextEncoder.Input("text_encoder", tooltip="The text_encoder output of Load Toy Editor."),
                io.String.Input("instruction", multiline=True, default="make the red circle blue",
                                tooltip="The edit instruction, in the toy world's words (colours, shapes, "
                                        "positions: see diffusers_ext.toy.world.vocabulary())."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, text_encoder, instruction: str) -> io.NodeOutput:
        return io.NodeOutput(text_encoder.encode(instruction))


class EditSteerToyCase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerToyCase",
            display_name="Toy Edit Case (EditSteer)",
            category=CATEGORY,
            description="One case of the procedural toy world: a 32x32 source scene, an instruction, the exact "
                        "target image and the edit mask. A pure function of (split, seed, index).",
            inputs=[
                io.Combo.Input("split", options=["heldout", "train"], default="heldout",
                               tooltip="heldout: edit combinations the toy editor never saw in training."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="World seed: picks the scenes and edits of this stream of cases."),
                io.Int.Input("index", default=0, min=0, max=2**31 - 1, tooltip="Case number within the stream."),
            ],
            outputs=[
                io.Image.Output(display_name="source"),
                io.String.Output(display_name="instruction"),
                io.Image.Output(display_name="target"),
                io.Mask.Output(display_name="edit_mask"),
            ],
        )

    @classmethod
    def execute(cls, split: str, seed: int, index: int) -> io.NodeOutput:
        from diffusers_ext.toy import world

        case = world.make_case(split, seed=seed, index=index)
        mask = torch.from_numpy(np.asarray(case.mask, dtype=np.float32)).unsqueeze(0)
        return io.NodeOutput(image_to_comfy(case.source), case.instruction, image_to_comfy(case.target), mask)


NODES = [EditSteerToyEditorLoader, EditSteerToyTextEncode, EditSteerToyCase]

"""ComfyUI nodes of the Inline Critic: load a critic, apply it to a Flux (Kontext) or Qwen-Image MODEL, look at its
error map.

The critic runs inside ComfyUI's own model through patches on a ``clone()`` (``critic_patch.py``); the input MODEL
is never modified, so an un-critiqued branch of the same graph keeps running the frozen editor.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from comfy_api.latest import io

CATEGORY = "EditSteer/Critic"
Critic = io.Custom("EDITSTEER_CRITIC")
CRITIC_FILE = "critic.safetensors"
#: Offered when the manifest lists no critic yet (kept so saved workflows stay valid).
DEFAULT_CRITICS = ("toy-critic",)


def critic_choices() -> list[str]:
    """Critic ids of ``weights_manifest/`` (resolved local-first at load) + critic files in ``models/editsteer``."""
    from diffusers_ext.weights import load_manifest, search_dirs

    ids = sorted(a.id for a in load_manifest().values()
                 if "critic" in a.id and any(f.path.endswith(CRITIC_FILE) for f in a.files))
    local = []
    for _, d in search_dirs():
        if not os.path.isdir(d):
            continue
        for root, _dirs, files in os.walk(d):
            for f in files:
                if f.endswith(".safetensors") and (f == CRITIC_FILE or "critic" in f):
                    rel = os.path.relpath(os.path.join(root, f), d)
                    art = rel.split(os.sep)[0]
                    if art not in ids:
                        local.append(rel.replace(os.sep, "/"))
    return (ids or list(DEFAULT_CRITICS)) + sorted(set(local))


def _local_file(name: str) -> str | None:
    from diffusers_ext.weights import search_dirs

    for _, d in search_dirs():
        p = os.path.join(d, *name.split("/"))
        if os.path.isfile(p):
            return p
    return None


class EditSteerCriticLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerCriticLoader",
            display_name="Load Inline Critic (EditSteer)",
            category=CATEGORY,
            description="Load Inline Critic weights: a manifest id is looked up in models/editsteer, then the "
                        "bundled copy, then the Hugging Face cache, and downloaded from the Hub only when allowed; "
                        "a critic file dropped into models/editsteer is listed by its path.",
            inputs=[
                io.Combo.Input("critic", options=critic_choices(),
                               tooltip="A critic id from weights_manifest/ or a critic .safetensors file found in "
                                       "ComfyUI/models/editsteer. It must be trained for the model you apply it to."),
                io.Boolean.Input("allow_download", default=False,
                                 tooltip="Allow a Hub download when no local copy exists (off: fully offline)."),
            ],
            outputs=[Critic.Output(display_name="critic")],
        )

    @classmethod
    def execute(cls, critic: str, allow_download: bool) -> io.NodeOutput:
        from diffusers_ext.critic import InlineCritic

        local = _local_file(critic)
        return io.NodeOutput(InlineCritic.from_pretrained(local or critic, allow_download=allow_download))


class EditSteerApplyCritic(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerApplyCritic",
            display_name="Apply Inline Critic (EditSteer)",
            category=CATEGORY,
            description="Run an Inline Critic inside a Flux (Kontext) or Qwen-Image(-Edit) MODEL: a learned token "
                        "critiques the model's intermediate predictions (an error map) and, in steer mode, steers "
                        "the later layers. Returns a patched copy; the input MODEL is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 Kontext or Qwen-Image-Edit MODEL (ComfyUI's own classes)."),
                Critic.Input("critic", tooltip="From Load Inline Critic; trained for this model family and size."),
                io.Combo.Input("mode", options=["steer", "critique", "off"], default="steer",
                               tooltip="steer: every token also attends to the critic (changes the edit). "
                                       "critique: the critic only reads: the plain model's output (bit for bit on "
                                       "CPU; a GPU may round the one extra text row's matrix products differently) "
                                       "plus an error map. off: the plain model."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Steer strength (steer mode): scales all of the critic's steering: the "
                                       "tokens' attention weight on the critic, and, where the critic has them, its "
                                       "gated attention and steering adapters' corrections (0 = critique only, 1 = "
                                       "as trained)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, critic, mode: str, strength: float) -> io.NodeOutput:
        from .critic_patch import apply_critic

        patched, _ = apply_critic(model, critic, mode=mode, scale=strength)
        return io.NodeOutput(patched)


def _resize_nearest(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(m[:, None].float(), size=(h, w), mode="nearest")[:, 0]


class EditSteerCriticErrorMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerCriticErrorMap",
            display_name="Inline Critic Error Map (EditSteer)",
            category=CATEGORY,
            description="Where the critic predicts the edit went wrong, from the latest sampling with the "
                        "critic-patched MODEL (averaged over the denoising steps, conditional pass): a heat map, "
                        "the heat map over the image, and a mask (bright = high predicted error).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Apply Inline Critic that the sampler used."),
                io.Image.Input("image", tooltip="The decoded edit: sets the output size, is shown under the "
                                                "overlay, and makes this node run after sampling."),
                io.Float.Input("overlay_opacity", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heat map over the image in the overlay output."),
            ],
            outputs=[
                io.Image.Output(display_name="heatmap"),
                io.Image.Output(display_name="overlay"),
                io.Mask.Output(display_name="error_mask"),
            ],
        )

    @classmethod
    def execute(cls, model, image, overlay_opacity: float) -> io.NodeOutput:
        from diffusers_ext.critic.pipelines import error_map_image
        from diffusers_ext.errors import EditSteerConfigError

        from .critic_patch import installed

        patch = installed(model)
        if patch is None:
            raise EditSteerConfigError("this MODEL has no Inline Critic (or its mode is off): connect the MODEL "
                                       "output of Apply Inline Critic that the sampler used")
        maps = patch.recorder.mean_map()
        if maps is None:
            raise EditSteerConfigError("the critic has recorded no error map yet: sample with this MODEL first "
                                       "(connect the decoded result of that sampler to image)")
        b, h, w = image.shape[0], image.shape[1], image.shape[2]
        maps = maps[torch.arange(b) % maps.shape[0]]
        peak = maps.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
        mask = _resize_nearest((maps / peak).clamp(0, 1), h, w)
        heat = torch.stack([torch.from_numpy(error_map_image(m, size=(h, w)).astype(np.float32) / 255.0)
                            for m in maps])
        a = float(overlay_opacity) * mask[..., None]
        overlay = image[..., :3].float().cpu() * (1 - a) + heat * a
        return io.NodeOutput(heat, overlay, mask)


NODES = [EditSteerCriticLoader, EditSteerApplyCritic, EditSteerCriticErrorMap]

"""EditSteer's shipped ComfyUI workflows: their graphs, the UI <-> API conversions, validation and pictures.

The graphs below are the source of ``workflows/<name>.json`` (UI "save" format, what users drag into ComfyUI) and
``workflows/api/<name>.json`` (API "prompt" format, what ``POST /prompt`` runs). The UI form is written the way the
frontend writes it (version 0.4: ``nodes`` with ``widgets_values`` in schema input order plus the hidden
``control_after_generate`` value after seed ints and the upload value after image pickers, ``links`` as
``[id, from_node, from_slot, to_node, to_slot, type]``), from the node definitions ComfyUI serves at
``/object_info``; a snapshot of those definitions (``tests/comfy_node_defs.json``) lets the pure tests check every
workflow without ComfyUI.

Regenerate everything after changing a graph or a node schema (needs ComfyUI, see README "Testing")::

    EDITSTEER_WRITE_WORKFLOWS=1 <the ComfyUI test command> tests/test_comfy_workflows.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
IMAGES_DIR = WORKFLOWS_DIR / "images"
DEFS_FILE = Path(__file__).with_name("comfy_node_defs.json")

FRONTEND_ONLY = {"MarkdownNote", "Note"}  # drawn by the frontend, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Combo inputs whose options are files of one installation (models, uploaded images): not checked against the
#: snapshot's option list (it is blanked there).
INSTALL_DEPENDENT = {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
                     ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"), ("LoadImage", "image"),
                     ("EditSteerCriticLoader", "critic")}
#: The toy workflows run end-to-end on a CPU (the tests execute them).
TOY_WORKFLOWS = ("editsteer_toy_edit", "editsteer_toy_critic_verilatent")


# ---------------------------------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    node: int
    slot: int


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str | None = None
    color: str | None = None

    def __getitem__(self, slot: int) -> Link:
        return Link(self.id, slot)


@dataclass
class Graph:
    name: str
    title: str
    nodes: list[Node] = field(default_factory=list)

    def node(self, type_: str, *, title: str | None = None, node_color: str | None = None, **inputs) -> Node:
        """Add a node; ``inputs`` are its inputs (``color`` too: EmptyImage has one), ``node_color`` its UI colour."""
        n = Node(len(self.nodes) + 1, type_, inputs, title, node_color)
        self.nodes.append(n)
        return n

    def note(self, text: str, title: str = "Read me") -> Node:
        return self.node("MarkdownNote", title=title, node_color="#432", text=text)

    def api(self) -> dict:
        """The API ("prompt") form: every executable node, links as ``["<id>", slot]``."""
        out = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            inputs = {k: ([str(v.node), v.slot] if isinstance(v, Link) else v) for k, v in n.inputs.items()}
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
        return out


def _note_toy() -> str:
    return ("**EditSteer toy editor** - runs on a CPU in seconds, no download.\n\n"
            "The toy editor is a tiny FLUX.1-Kontext-class model trained on EditSteer's procedural toy world (32x32 "
            "scenes of coloured shapes). *Load Toy Editor* builds a ComfyUI MODEL run by ComfyUI's own Flux class, "
            "so the stock Kontext nodes (ReferenceLatent, guiders, samplers) drive it. Change *index* on "
            "*Toy Edit Case* for another scene and instruction.")


def toy_edit() -> Graph:
    g = Graph("editsteer_toy_edit", "Toy editor: one edit with ComfyUI's own Flux sampler (CPU)")
    g.note(_note_toy())
    toy = g.node("EditSteerToyEditorLoader", editor="toy-kontext-editor", allow_download=False)
    case = g.node("EditSteerToyCase", split="heldout", seed=0, index=0)
    cond = g.node("EditSteerToyTextEncode", text_encoder=toy[2], instruction=case[1])
    src = g.node("VAEEncode", pixels=case[0], vae=toy[1])
    ref = g.node("ReferenceLatent", conditioning=cond[0], latent=src[0])
    guider = g.node("BasicGuider", model=toy[0], conditioning=ref[0])
    noise = g.node("RandomNoise", noise_seed=0)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=toy[0], scheduler="simple", steps=8, denoise=1.0)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                 latent_image=src[0])
    img = g.node("VAEDecode", samples=out[0], vae=toy[1])
    g.node("SaveImage", images=img[0], filename_prefix="EditSteer/toy_edit")
    g.node("PreviewImage", title="Source | exact target", images=g.node(
        "ImageStitch", image1=case[0], direction="right", match_image_size=True, spacing_width=2,
        spacing_color="white", image2=case[2])[0])
    return g


def toy_critic_verilatent() -> Graph:
    g = Graph("editsteer_toy_critic_verilatent",
              "Toy editor with the Inline Critic and a VeriLatent search stacked (CPU)")
    g.note(_note_toy() + "\n\n*Apply Inline Critic* patches a copy of the MODEL (steer mode); *VeriLatent Sampler* "
           "wraps the euler sampler and searches over starting noises. The report shows the NFE spent and the "
           "chosen seed (a plain run with that seed gives the same image); the error map shows where the critic "
           "expects the edit to be wrong.")
    toy = g.node("EditSteerToyEditorLoader", editor="toy-kontext-editor", allow_download=False)
    case = g.node("EditSteerToyCase", split="heldout", seed=0, index=0)
    cond = g.node("EditSteerToyTextEncode", text_encoder=toy[2], instruction=case[1])
    src = g.node("VAEEncode", pixels=case[0], vae=toy[1])
    ref = g.node("ReferenceLatent", conditioning=cond[0], latent=src[0])
    critic = g.node("EditSteerCriticLoader", critic="toy-critic", allow_download=False)
    model = g.node("EditSteerApplyCritic", model=toy[0], critic=critic[0], mode="steer", strength=1.0)
    guider = g.node("BasicGuider", model=model[0], conditioning=ref[0])
    noise = g.node("RandomNoise", noise_seed=0)
    base = g.node("KSamplerSelect", sampler_name="euler")
    search = g.node("EditSteerVeriLatentSampler", sampler=base[0], candidates=4, budget=8, early_step=2, top_m=1,
                    round_size=4, rollout_batch=4)  # the toy: a whole round per model call
    sigmas = g.node("BasicScheduler", model=model[0], scheduler="simple", steps=8, denoise=1.0)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=search[0], sigmas=sigmas[0],
                 latent_image=src[0])
    img = g.node("VAEDecode", samples=out[0], vae=toy[1])
    g.node("SaveImage", images=img[0], filename_prefix="EditSteer/toy_critic_verilatent")
    report = g.node("EditSteerVeriLatentReport", search_log=search[1], latent=out[0])
    g.node("PreviewImage", title="Candidates' edit maps | expected region", images=report[3])
    emap = g.node("EditSteerCriticErrorMap", model=model[0], image=img[0], overlay_opacity=0.6)
    g.node("PreviewImage", title="Critic error map over the edit", images=emap[1])
    return g


def _kontext_inputs(g: Graph, prompt: str):
    unet = g.node("UNETLoader", unet_name="flux1-dev-kontext_fp8_scaled.safetensors", weight_dtype="default")
    clip = g.node("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp8_e4m3fn_scaled.safetensors",
                  type="flux", device="default")
    vae = g.node("VAELoader", vae_name="ae.safetensors")
    image = g.node("LoadImage", image="example.png")
    scaled = g.node("FluxKontextImageScale", image=image[0])
    src = g.node("VAEEncode", pixels=scaled[0], vae=vae[0])
    text = g.node("CLIPTextEncode", title="Edit instruction", node_color="#232", text=prompt, clip=clip[0])
    ref = g.node("ReferenceLatent", conditioning=text[0], latent=src[0])
    pos = g.node("FluxGuidance", conditioning=ref[0], guidance=2.5)
    return unet, vae, text, src, pos


_KONTEXT_FILES = ("Models (as for ComfyUI's FLUX.1 Kontext [dev] template): `flux1-dev-kontext_fp8_scaled.safetensors` "
                  "in models/diffusion_models, `clip_l.safetensors` + `t5xxl_fp8_e4m3fn_scaled.safetensors` in "
                  "models/text_encoders, `ae.safetensors` in models/vae.")


def kontext_critic() -> Graph:
    g = Graph("editsteer_kontext_critic", "FLUX.1 Kontext [dev] with the Inline Critic")
    g.note(_KONTEXT_FILES + "\n\nCritic: a Kontext critic trained with `editsteer train critic`, in "
           "models/editsteer/flux-kontext-critic/critic.safetensors. *Apply Inline Critic* patches a copy of the "
           "MODEL; the error map shows where the critic expects the edit to be wrong.")
    unet, vae, text, src, pos = _kontext_inputs(g, "make the car red")
    critic = g.node("EditSteerCriticLoader", critic="flux-kontext-critic/critic.safetensors", allow_download=False)
    model = g.node("EditSteerApplyCritic", model=unet[0], critic=critic[0], mode="steer", strength=1.0)
    neg = g.node("ConditioningZeroOut", conditioning=text[0])
    out = g.node("KSampler", model=model[0], seed=0, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple",
                 positive=pos[0], negative=neg[0], latent_image=src[0], denoise=1.0)
    img = g.node("VAEDecode", samples=out[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="EditSteer/kontext_critic")
    emap = g.node("EditSteerCriticErrorMap", model=model[0], image=img[0], overlay_opacity=0.6)
    g.node("PreviewImage", title="Critic error map over the edit", images=emap[1])
    return g


def kontext_verilatent() -> Graph:
    g = Graph("editsteer_kontext_verilatent", "VeriLatent search with any edit model (here FLUX.1 Kontext [dev])")
    g.note(_KONTEXT_FILES + "\n\n*VeriLatent Sampler* wraps any sampler of SamplerCustomAdvanced, so it works with "
           "any edit MODEL and GUIDER (swap the loaders for Qwen-Image-Edit and connect source_latent). The report "
           "shows the NFE spent and the chosen seed; RandomNoise with that seed reproduces the image.")
    unet, vae, text, src, pos = _kontext_inputs(g, "make the car red")
    guider = g.node("BasicGuider", model=unet[0], conditioning=pos[0])
    noise = g.node("RandomNoise", noise_seed=0)
    base = g.node("KSamplerSelect", sampler_name="euler")
    search = g.node("EditSteerVeriLatentSampler", sampler=base[0], candidates=4, budget=8, early_step=2, top_m=1,
                    round_size=4, rollout_batch=1)  # one candidate per model call: memory as for one image
    sigmas = g.node("BasicScheduler", model=unet[0], scheduler="simple", steps=20, denoise=1.0)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=search[0], sigmas=sigmas[0],
                 latent_image=src[0])
    img = g.node("VAEDecode", samples=out[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="EditSteer/kontext_verilatent")
    report = g.node("EditSteerVeriLatentReport", search_log=search[1], latent=out[0])
    g.node("PreviewImage", title="Candidates' edit maps | expected region", images=report[3])
    return g


def qwen_edit_critic() -> Graph:
    g = Graph("editsteer_qwen_image_edit_critic", "Qwen-Image-Edit with the Inline Critic")
    g.note("Models (as for ComfyUI's Qwen-Image-Edit template): `qwen_image_edit_fp8_e4m3fn.safetensors` in "
           "models/diffusion_models, `qwen_2.5_vl_7b_fp8_scaled.safetensors` in models/text_encoders, "
           "`qwen_image_vae.safetensors` in models/vae.\n\nCritic: a Qwen-Image-Edit critic trained with "
           "`editsteer train critic`, in models/editsteer/qwen-image-edit-critic/critic.safetensors.")
    unet = g.node("UNETLoader", unet_name="qwen_image_edit_fp8_e4m3fn.safetensors", weight_dtype="default")
    clip = g.node("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image",
                  device="default")
    vae = g.node("VAELoader", vae_name="qwen_image_vae.safetensors")
    image = g.node("LoadImage", image="example.png")
    scaled = g.node("ImageScaleToTotalPixels", image=image[0], upscale_method="lanczos", megapixels=1.0)
    pos = g.node("TextEncodeQwenImageEdit", title="Edit instruction", node_color="#232", clip=clip[0],
                 prompt="make the car red", vae=vae[0], image=scaled[0])
    neg = g.node("TextEncodeQwenImageEdit", title="Negative", node_color="#322", clip=clip[0], prompt="", vae=vae[0],
                 image=scaled[0])
    shift = g.node("ModelSamplingAuraFlow", model=unet[0], shift=3.0)
    norm = g.node("CFGNorm", model=shift[0], strength=1.0)
    critic = g.node("EditSteerCriticLoader", critic="qwen-image-edit-critic/critic.safetensors", allow_download=False)
    model = g.node("EditSteerApplyCritic", model=norm[0], critic=critic[0], mode="steer", strength=1.0)
    src = g.node("VAEEncode", pixels=scaled[0], vae=vae[0])
    out = g.node("KSampler", model=model[0], seed=0, steps=20, cfg=2.5, sampler_name="euler", scheduler="simple",
                 positive=pos[0], negative=neg[0], latent_image=src[0], denoise=1.0)
    img = g.node("VAEDecode", samples=out[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="EditSteer/qwen_image_edit_critic")
    emap = g.node("EditSteerCriticErrorMap", model=model[0], image=img[0], overlay_opacity=0.6)
    g.node("PreviewImage", title="Critic error map over the edit", images=emap[1])
    return g


def anchoredit_toy() -> Graph:
    """Three turns of a session on the bundled toy AnchorEdit model (node ids are used by test_anchoredit_comfy)."""
    g = Graph("editsteer_anchoredit_toy", "AnchorEdit: a three-turn session on the toy model (CPU)")
    model = g.node("EditSteerAnchorEditModel", title="AnchorEdit Model", model="toy-anchoredit")
    src = g.node("EmptyImage", title="Source: black 32x32", width=32, height=32, batch_size=1, color=986895)
    start = g.node("EditSteerAnchorEditStart", title="AnchorEdit Start Session", model=model[0], image=src[0], seed=0,
                   sampler="model default", flow_steps=24)
    t1 = g.node("EditSteerAnchorEditTurn", title="Turn 1", session=start[0],
                instruction="add a red circle at the center", seed=-1, preview=True)
    t2 = g.node("EditSteerAnchorEditTurn", title="Turn 2", session=t1[0], instruction="make the red circle blue",
                seed=-1, preview=True)
    t3 = g.node("EditSteerAnchorEditTurn", title="Turn 3", session=t2[0],
                instruction="move the blue circle to the top left", seed=-1, preview=True)
    hist = g.node("EditSteerAnchorEditHistory", title="AnchorEdit History", session=t3[0])
    g.node("SaveImage", title="Save every turn", images=hist[0], filename_prefix="anchoredit_toy")
    g.node("EditSteerAnchorEditSaveSession", title="AnchorEdit Save Session", session=t3[0],
           filename_prefix="anchoredit_toy", include_cache=True)
    return g


def anchoredit_resume() -> Graph:
    """Continue a saved session: load it, take the last turn back, edit again."""
    g = Graph("editsteer_anchoredit_resume", "AnchorEdit: resume a saved session, undo a turn, edit again (CPU)")
    g.note("Run *editsteer_anchoredit_toy* first: its *AnchorEdit Save Session* writes "
           "`output/editsteer_sessions/anchoredit_toy_00001` (.safetensors + .json: turns, images, KV cache). *AnchorEdit "
           "Load Session* reads it back (a name in that folder, or a full path), *AnchorEdit Undo* drops the last turn "
           "and its cache entries, and the next turn continues from there: the same result as if the session had "
           "never been saved.")
    model = g.node("EditSteerAnchorEditModel", title="AnchorEdit Model", model="toy-anchoredit")
    load = g.node("EditSteerAnchorEditLoadSession", model=model[0], path="anchoredit_toy_00001")
    undo = g.node("EditSteerAnchorEditUndo", session=load[0], turns=1)
    turn = g.node("EditSteerAnchorEditTurn", title="Turn 3, again", session=undo[0],
                  instruction="move the blue circle to the bottom right", seed=-1, preview=True)
    hist = g.node("EditSteerAnchorEditHistory", title="AnchorEdit History", session=turn[0])
    g.node("SaveImage", title="Save every turn", images=hist[0], filename_prefix="anchoredit_resumed")
    return g


def mln_toy() -> Graph:
    """One MLN edit of a held-out toy case on the bundled toy Switti (node ids are used by test_mln_comfy)."""
    g = Graph("editsteer_mln_toy", "Masked Logit Nudging on the toy Switti (CPU)")
    case = g.node("EditSteerMLNToyCase", title="Toy Edit Case (MLN)", split="heldout", index=0, case_seed=0,
                  captions="focus")
    switti = g.node("EditSteerSwittiLoader", title="Switti Loader (MLN)", model="toy-switti (bundled, 32 px)",
                    dtype="auto", allow_download=False)
    edit = g.node("EditSteerMLNEdit", title="MLN Edit (Switti)", switti=switti[0], image=case[0],
                  source_prompt=case[1], target_prompt=case[2], seed=42, preset="auto", global_edit=False,
                  refine=True, mask_mode="replace", preview=True, anchor="preset", variant="paper")
    g.node("SaveImage", title="Save edited image", images=edit[0], filename_prefix="editsteer_mln")
    mask = g.node("MaskToImage", title="Convert Mask to Image", mask=edit[1])
    g.node("SaveImage", title="Save edit mask", images=mask[0], filename_prefix="editsteer_mln_mask")
    g.node("PreviewImage", title="Exact target (toy ground truth)", images=case[4])
    return g


WORKFLOWS: dict[str, Callable[[], Graph]] = {
    "editsteer_toy_edit": toy_edit,
    "editsteer_toy_critic_verilatent": toy_critic_verilatent,
    "editsteer_kontext_critic": kontext_critic,
    "editsteer_qwen_image_edit_critic": qwen_edit_critic,
    "editsteer_kontext_verilatent": kontext_verilatent,
    "editsteer_anchoredit_toy": anchoredit_toy,
    "editsteer_anchoredit_resume": anchoredit_resume,
    "editsteer_mln_toy": mln_toy,
}


# ---------------------------------------------------------------------------------------------------------------------
# Node definitions (a subset of /object_info)
# ---------------------------------------------------------------------------------------------------------------------


def load_defs() -> dict:
    return json.loads(DEFS_FILE.read_text())


def snapshot_defs(object_info: dict, types) -> dict:
    """The definitions of ``types`` from a live ``/object_info``, with installation-dependent option lists
    blanked (so the snapshot does not depend on which model files a machine has)."""
    out = {}
    for t in sorted(set(types) - FRONTEND_ONLY):
        d = json.loads(json.dumps(object_info[t]))
        keep = {k: d[k] for k in ("input", "input_order", "output", "output_name", "output_node", "display_name")
                if k in d}
        for section in ("required", "optional"):
            for name, spec in keep["input"].get(section, {}).items():
                if (t, name) in INSTALL_DEPENDENT:
                    if isinstance(spec[0], list):
                        spec[0] = []
                    elif len(spec) > 1 and "options" in spec[1]:
                        spec[1]["options"] = []
                if len(spec) > 1:  # tooltips are documentation, not structure
                    spec[1].pop("tooltip", None)
        out[t] = keep
    return out


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "INT", "COMBO", "MODEL"...
    opts: dict
    optional: bool
    options: list | None  # combo options

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput")

    @property
    def has_control(self) -> bool:  # the frontend's hidden control_after_generate widget
        return self.type == "INT" and bool(self.opts.get("control_after_generate"))

    @property
    def has_upload(self) -> bool:  # the frontend's upload button widget after an image picker
        return bool(self.opts.get("image_upload"))

    def default(self):
        if "default" in self.opts:
            return self.opts["default"]
        if self.options:
            return self.options[0]
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type, "")


def input_specs(defs: dict, type_: str) -> list[InputSpec]:
    d = defs[type_]
    order = d.get("input_order") or {s: list(d["input"].get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = d["input"][section][name]
            t, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            options = None
            if isinstance(t, list):
                t, options = "COMBO", t
            elif t == "COMBO":
                options = opts.get("options", [])
            specs.append(InputSpec(name, t, opts, section == "optional", options))
    return specs


# ---------------------------------------------------------------------------------------------------------------------
# UI form
# ---------------------------------------------------------------------------------------------------------------------

_WIDTH = 300
_COL = 360


def _size(n: Node, defs: dict) -> tuple[int, int]:
    specs = input_specs(defs, n.type)
    sockets = sum(1 for sp in specs if not sp.is_widget or isinstance(n.inputs.get(sp.name), Link))
    widgets = sum(1 + sp.has_control + sp.has_upload for sp in specs if sp.is_widget)
    rows = max(sockets, len(defs[n.type]["output"]))
    long_text = any(isinstance(v, str) and len(v) > 40 for v in n.inputs.values())
    return _WIDTH, 16 + 20 * rows + 24 * widgets + (72 if long_text else 0)


def _layout(g: Graph, defs: dict) -> dict[int, tuple[int, int, int, int]]:
    """Node id -> (x, y, w, h): columns by longest path from a source node, stacked per column."""
    depth: dict[int, int] = {}
    by_id = {n.id: n for n in g.nodes}

    def d(nid: int) -> int:
        if nid not in depth:
            ups = [v.node for v in by_id[nid].inputs.values() if isinstance(v, Link)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    boxes, y_col = {}, {}
    for n in g.nodes:
        if n.type in FRONTEND_ONLY:
            continue
        col = d(n.id)
        w, h = _size(n, defs)
        y = y_col.get(col, 0)
        boxes[n.id] = (col * _COL, y, w, h)
        y_col[col] = y + h + 60
    notes = [n for n in g.nodes if n.type in FRONTEND_ONLY]
    for i, n in enumerate(notes):
        boxes[n.id] = (-_COL - 160, i * 360, 480, 320)
    return boxes


def to_ui(g: Graph, defs: dict, versions: dict | None = None) -> dict:
    """The UI ("save") form of ``g`` as the frontend writes it (workflow JSON version 0.4)."""
    versions = versions or {}
    boxes = _layout(g, defs)
    links = []
    node_inputs: dict[int, list] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    api_nodes = [n for n in g.nodes if n.type not in FRONTEND_ONLY]
    types_out = {n.id: defs[n.type]["output"] for n in api_nodes}
    for n in api_nodes:
        entries = []
        for spec in input_specs(defs, n.type):
            v = n.inputs.get(spec.name)
            if spec.is_widget and not isinstance(v, Link):
                continue
            entry = {"name": spec.name, "type": spec.type}
            if spec.optional:
                entry["shape"] = 7
            if spec.is_widget:
                entry["widget"] = {"name": spec.name}
            link_id = None
            if isinstance(v, Link):
                link_id = len(links) + 1
                links.append([link_id, v.node, v.slot, n.id, len(entries), types_out[v.node][v.slot]])
                out_links.setdefault((v.node, v.slot), []).append(link_id)
            entry["link"] = link_id
            entries.append(entry)
        node_inputs[n.id] = entries
    order = {n.id: i for i, n in enumerate(_topological(g))}
    nodes = []
    for n in g.nodes:
        x, y, w, h = boxes[n.id]
        node = {"id": n.id, "type": n.type, "pos": [x, y], "size": [w, h], "flags": {}, "order": order[n.id],
                "mode": 0}
        if n.type in FRONTEND_ONLY:
            node.update(inputs=[], outputs=[], properties={}, widgets_values=[n.inputs["text"]])
        else:
            d = defs[n.type]
            node["inputs"] = node_inputs[n.id]
            node["outputs"] = [{"name": d["output_name"][i], "type": t, "links": out_links.get((n.id, i)),
                                "slot_index": i} for i, t in enumerate(d["output"])]
            core = not n.type.startswith("EditSteer")
            node["properties"] = {"Node name for S&R": n.type, "cnr_id": "comfy-core" if core else "editsteer",
                                  "ver": versions.get("comfy-core" if core else "editsteer", "")}
            values = []
            for spec in input_specs(defs, n.type):
                if not spec.is_widget:
                    continue
                v = n.inputs.get(spec.name, spec.default())
                values.append(spec.default() if isinstance(v, Link) else v)
                if spec.has_control:
                    values.append("fixed")
                if spec.has_upload:
                    values.append("image")
            node["widgets_values"] = values
        if n.title:
            node["title"] = n.title
        if n.color:
            node["color"] = n.color
            node["bgcolor"] = {"#432": "#653", "#232": "#353", "#322": "#533"}.get(n.color, n.color)
        nodes.append(node)
    return {"id": f"editsteer-{g.name}", "revision": 0, "last_node_id": max(n.id for n in g.nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [_COL + 200, 60]}, "editsteer": {"title": g.title}},
            "version": 0.4}


def _topological(g: Graph) -> list[Node]:
    done, out = set(), []
    by_id = {n.id: n for n in g.nodes}

    def visit(n: Node):
        if n.id in done:
            return
        for v in n.inputs.values():
            if isinstance(v, Link):
                visit(by_id[v.node])
        done.add(n.id)
        out.append(n)

    for n in g.nodes:
        visit(n)
    return out


def ui_to_api(ui: dict, defs: dict) -> dict:
    """What the frontend's "Export (API)" does with a UI workflow (without the ``_meta`` titles)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        t = node["type"]
        if t in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for spec in input_specs(defs, t):
            if spec.is_widget:
                v = values.pop(0)
                if spec.has_control:
                    values.pop(0)
                if spec.has_upload:
                    values.pop(0)
                if spec.name not in linked:
                    inputs[spec.name] = v
            if spec.name in linked:
                src = links[linked[spec.name]]
                inputs[spec.name] = [str(src[1]), src[2]]
        if values:
            raise ValueError(f"node {node['id']} ({t}) has {len(values)} widget values too many: {values}")
        api[str(node["id"])] = {"class_type": t, "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def _type_ok(spec: InputSpec, v) -> bool:
    if spec.type == "INT":
        return isinstance(v, int) and not isinstance(v, bool)
    if spec.type == "FLOAT":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if spec.type == "BOOLEAN":
        return isinstance(v, bool)
    if spec.type == "STRING":
        return isinstance(v, str)
    return True


def validate_api(api: dict, defs: dict) -> list[str]:
    """Problems of an API workflow against node definitions: unknown node ids or inputs, missing required inputs,
    links to missing nodes or slots, type mismatches, widget values of the wrong type, out of range or not among
    the options."""
    problems = []
    for nid, node in api.items():
        t = node["class_type"]
        if t not in defs:
            problems.append(f"node {nid}: unknown node type {t!r}")
            continue
        specs = {s.name: s for s in input_specs(defs, t)}
        for name in node["inputs"]:
            if name not in specs:
                problems.append(f"node {nid} ({t}): no input named {name!r}")
        for spec in specs.values():
            where = f"node {nid} ({t}).{spec.name}"
            if spec.name not in node["inputs"]:
                if not spec.optional:
                    problems.append(f"{where}: required input missing")
                continue
            v = node["inputs"][spec.name]
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                src = api.get(v[0])
                if src is None:
                    problems.append(f"{where}: links to missing node {v[0]}")
                    continue
                outs = defs.get(src["class_type"], {}).get("output", [])
                if not 0 <= v[1] < len(outs):
                    problems.append(f"{where}: links to missing output {v[1]} of node {v[0]}")
                elif outs[v[1]] != spec.type and "*" not in (outs[v[1]], spec.type):
                    problems.append(f"{where}: expects {spec.type} but node {v[0]} output {v[1]} is {outs[v[1]]}")
                continue
            if not spec.is_widget:
                problems.append(f"{where}: a {spec.type} input needs a link, got the value {v!r}")
            elif not _type_ok(spec, v):
                problems.append(f"{where}: {v!r} is not a {spec.type}")
            elif spec.type == "COMBO" and (t, spec.name) not in INSTALL_DEPENDENT and v not in (spec.options or []):
                problems.append(f"{where}: {v!r} is not one of {spec.options}")
            elif spec.type in ("INT", "FLOAT"):
                lo, hi = spec.opts.get("min"), spec.opts.get("max")
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    problems.append(f"{where}: {v} is outside [{lo}, {hi}]")
    return problems


def validate_ui(ui: dict, defs: dict) -> list[str]:
    """Problems of a UI workflow: dangling or inconsistent links, slot names/types that disagree with the node
    definitions, widget value counts that do not match the schema."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for l in ui["links"]:
        lid, a, a_slot, b, b_slot, typ = l
        if a not in nodes or b not in nodes:
            problems.append(f"link {lid}: missing node")
            continue
        outs = nodes[a].get("outputs", [])
        ins = nodes[b].get("inputs", [])
        if a_slot >= len(outs) or lid not in (outs[a_slot].get("links") or []):
            problems.append(f"link {lid}: node {a} output {a_slot} does not list it")
        if b_slot >= len(ins) or ins[b_slot].get("link") != lid:
            problems.append(f"link {lid}: node {b} input {b_slot} does not hold it")
        elif ins[b_slot]["type"] != typ and "*" not in (typ, ins[b_slot]["type"]):
            problems.append(f"link {lid}: type {typ} into {ins[b_slot]['type']}")
    for n in ui["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        if t not in defs:
            problems.append(f"node {n['id']}: unknown node type {t!r}")
            continue
        specs = {s.name: s for s in input_specs(defs, t)}
        for i in n.get("inputs", []):
            s = specs.get(i["name"])
            if s is None:
                problems.append(f"node {n['id']} ({t}): no input named {i['name']!r}")
            elif s.type != i["type"]:
                problems.append(f"node {n['id']} ({t}).{i['name']}: type {i['type']} but the node says {s.type}")
        outs = defs[t]["output"]
        if [o["type"] for o in n.get("outputs", [])] != list(outs):
            problems.append(f"node {n['id']} ({t}): outputs {[o['type'] for o in n.get('outputs', [])]} but the "
                            f"node has {outs}")
        want = sum(1 + s.has_control + s.has_upload for s in specs.values() if s.is_widget)
        if len(n.get("widgets_values", [])) != want:
            problems.append(f"node {n['id']} ({t}): {len(n.get('widgets_values', []))} widget values, the node has "
                            f"{want}")
    return problems


def workflow_files() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def read_workflow(name: str) -> tuple[dict, dict]:
    """(UI form, API form) of a shipped workflow."""
    return (json.loads((WORKFLOWS_DIR / f"{name}.json").read_text()),
            json.loads((API_DIR / f"{name}.json").read_text()))


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------------

TYPE_COLOURS = {"MODEL": (180, 140, 255), "CONDITIONING": (255, 170, 60), "LATENT": (255, 120, 200),
                "IMAGE": (100, 180, 255), "VAE": (255, 90, 90), "MASK": (120, 220, 120), "SAMPLER": (240, 240, 110),
                "SIGMAS": (200, 220, 120), "NOISE": (200, 200, 200), "GUIDER": (120, 230, 230), "CLIP": (255, 220, 80),
                "STRING": (160, 220, 160), "INT": (160, 200, 255)}


def _widget_labels(node: dict, defs: dict | None) -> list[str]:
    values = list(node.get("widgets_values", []))
    if defs is None or node["type"] not in defs:
        return [str(v) for v in values]
    out = []
    for spec in input_specs(defs, node["type"]):
        if not spec.is_widget or not values:
            continue
        v = values.pop(0)
        linked = any(i["name"] == spec.name and i.get("link") is not None for i in node.get("inputs", []))
        if not linked:
            out.append(f"{spec.name}: {v}")
        for _ in range(spec.has_control + spec.has_upload):
            extra = values.pop(0)
            if spec.has_control:
                out.append(f"  control after generate: {extra}")
    return out


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    lines = []
    for para in text.replace("**", "").replace("*", "").replace("`", "").split("\n"):
        lines.extend(textwrap.wrap(para, width) or [""])
    return lines


def render_png(ui: dict, path: Path, title: str | None = None, defs: dict | None = None) -> Path:
    """A node-box picture of a UI workflow (what the graph looks like in ComfyUI, simplified)."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = ui["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 40
    y0 = min(n["pos"][1] for n in nodes) - 90
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 40
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 40
    s = 0.75
    img = Image.new("RGB", (int((x1 - x0) * s), int((y1 - y0) * s)), (32, 32, 36))
    dr = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=12)
        big = ImageFont.load_default(size=22)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()

    def P(x, y):
        return ((x - x0) * s, (y - y0) * s)

    by_id = {n["id"]: n for n in nodes}
    slot_pos = {}
    for n in nodes:
        x, y = n["pos"]
        w = n["size"][0]
        for i, _ in enumerate(n.get("inputs", [])):
            slot_pos[("in", n["id"], i)] = (x, y + 14 + 20 * i)
        for i, _ in enumerate(n.get("outputs", [])):
            slot_pos[("out", n["id"], i)] = (x + w, y + 14 + 20 * i)
    for n in nodes:  # boxes
        x, y = n["pos"]
        w, h = n["size"]
        note = n["type"] in FRONTEND_ONLY
        body = (53, 53, 58) if not note else (74, 62, 40)
        head = (40, 40, 44) if not n["type"].startswith("EditSteer") else (44, 70, 110)
        dr.rounded_rectangle([P(x, y - 30), P(x + w, y + h)], radius=6, fill=body, outline=(90, 90, 96))
        dr.rounded_rectangle([P(x, y - 30), P(x + w, y)], radius=6, fill=head if not note else (60, 50, 30))
        label = n.get("title") or ((defs or {}).get(n["type"], {}).get("display_name") or n["type"])
        dr.text(P(x + 8, y - 24), label, fill=(235, 235, 235), font=font)
        if note:
            for j, line in enumerate(_wrap(str(n["widgets_values"][0]), 62)[:22]):
                dr.text(P(x + 10, y + 8 + 18 * j), line, fill=(225, 215, 190), font=font)
            continue
        for i, inp in enumerate(n.get("inputs", [])):
            cx, cy = slot_pos[("in", n["id"], i)]
            col = TYPE_COLOURS.get(inp["type"], (180, 180, 180))
            dr.ellipse([P(cx - 5, cy - 5), P(cx + 5, cy + 5)], fill=col)
            dr.text(P(cx + 10, cy - 7), inp["name"], fill=(200, 200, 200), font=font)
        for i, out in enumerate(n.get("outputs", [])):
            cx, cy = slot_pos[("out", n["id"], i)]
            col = TYPE_COLOURS.get(out["type"], (180, 180, 180))
            dr.ellipse([P(cx - 5, cy - 5), P(cx + 5, cy + 5)], fill=col)
            label = out["name"]
            tw = dr.textlength(label, font=font)
            dr.text((P(cx - 10, cy - 7)[0] - tw, P(cx, cy - 7)[1]), label, fill=(200, 200, 200), font=font)
        wy = y + 6 + 20 * max(len(n.get("inputs", [])), len(n.get("outputs", [])))
        for text in _widget_labels(n, defs):
            text = text.replace("\n", " ")
            text = text if len(text) < 46 else text[:43] + "..."
            dr.rounded_rectangle([P(x + 8, wy), P(x + w - 8, wy + 19)], radius=4, fill=(34, 34, 38))
            dr.text(P(x + 14, wy + 3), text, fill=(175, 200, 175), font=font)
            wy += 24
    for l in ui["links"]:  # links on top
        _, a, a_slot, b, b_slot, typ = l
        if a not in by_id or b not in by_id:
            continue
        (ax, ay), (bx, by) = slot_pos[("out", a, a_slot)], slot_pos[("in", b, b_slot)]
        col = TYPE_COLOURS.get(typ, (180, 180, 180))
        pts = []
        for k in range(25):
            t = k / 24
            c = max(60.0, abs(bx - ax) / 2)
            px = (1 - t) ** 3 * ax + 3 * (1 - t) ** 2 * t * (ax + c) + 3 * (1 - t) * t ** 2 * (bx - c) + t ** 3 * bx
            py = (1 - t) ** 3 * ay + 3 * (1 - t) ** 2 * t * ay + 3 * (1 - t) * t ** 2 * by + t ** 3 * by
            pts.append(P(px, py))
        dr.line(pts, fill=col, width=2)
    if title:
        dr.text((16, 14), title, fill=(240, 240, 240), font=big)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path

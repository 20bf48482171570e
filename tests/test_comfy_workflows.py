"""The shipped ComfyUI workflows: every node id and input exists, the UI and API forms agree, and (with ComfyUI)
the node-definition snapshot is current and ComfyUI's own validator accepts them.

Pure tests run in CI without ComfyUI, against ``tests/comfy_node_defs.json``. With ``EDITSTEER_WRITE_WORKFLOWS=1``
and ComfyUI present, :func:`test_snapshot_and_workflows_are_current` rewrites the snapshot, the workflow files and
their pictures instead of comparing them.
"""

from __future__ import annotations

import json
import os

import pytest
from comfy_harness import comfy, comfy_server, requires_comfyui  # noqa: F401
from fixtures_comfy import toy_critic_ref, toy_editor_ref  # noqa: F401
from fixtures_comfy_workflows import (API_DIR, IMAGES_DIR, TOY_WORKFLOWS, WORKFLOWS, WORKFLOWS_DIR, Graph,
                                      input_specs, load_defs, read_workflow, render_png, snapshot_defs, strip_meta,
                                      to_ui, ui_to_api, validate_api, validate_ui, workflow_files)

WRITE = os.environ.get("EDITSTEER_WRITE_WORKFLOWS") == "1"


def test_every_graph_is_shipped_in_both_forms():
    assert workflow_files() == sorted(WORKFLOWS)
    for name in WORKFLOWS:
        assert (API_DIR / f"{name}.json").is_file(), f"{name} has no API form"
    assert set(TOY_WORKFLOWS) <= set(WORKFLOWS)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_references_only_existing_nodes_and_inputs(name):
    defs = load_defs()
    ui, api = read_workflow(name)
    assert validate_api(api, defs) == []
    assert validate_ui(ui, defs) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_ui_and_api_forms_agree(name):
    defs = load_defs()
    ui, api = read_workflow(name)
    assert ui_to_api(ui, defs) == strip_meta(api)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_committed_files_are_the_graphs(name):
    """The files are generated from the graphs in fixtures_comfy_workflows.py; edit those, then regenerate."""
    defs = load_defs()
    g = WORKFLOWS[name]()
    ui, api = read_workflow(name)
    assert api == g.api()
    assert ui == to_ui(g, defs)


def test_validator_reports_broken_workflows():
    defs = load_defs()
    g = Graph("broken", "broken")
    case = g.node("EditSteerToyCase", split="heldout", seed=0, index=0)
    g.node("VAEDecode", samples=case[0], vae=case[0])  # IMAGE into LATENT and VAE
    g.node("EditSteerNoSuchNode", x=1)
    g.node("EditSteerToyCase", split="valid", seed=-1, index=0, colour="red")
    problems = "\n".join(validate_api(g.api(), defs))
    assert "expects LATENT but node 1 output 0 is IMAGE" in problems
    assert "unknown node type 'EditSteerNoSuchNode'" in problems
    assert "'valid' is not one of" in problems
    assert "-1 is outside" in problems
    assert "no input named 'colour'" in problems
    ui = to_ui(WORKFLOWS["editsteer_toy_edit"](), defs)
    ui["nodes"][1]["widgets_values"].append(3)
    ui["links"][0][5] = "MODEL"
    problems = "\n".join(validate_ui(ui, defs))
    assert "widget values, the node has" in problems and "type MODEL into" in problems


def test_every_editsteer_node_has_tooltips_and_is_in_a_workflow():
    defs = load_defs()
    ours = sorted(t for t in defs if t.startswith("EditSteer"))
    assert len(ours) >= 9
    used = {n["class_type"] for name in WORKFLOWS for n in read_workflow(name)[1].values()}
    assert set(ours) - used <= {"EditSteerVeriLatentEdit"}, set(ours) - used
    for t in ours:
        assert input_specs(defs, t), t


# -- with ComfyUI -----------------------------------------------------------------------------------------------------


@requires_comfyui
def test_snapshot_and_workflows_are_current(comfy_server):
    info = comfy_server.get("/object_info")
    types = {n.type for g in (f() for f in WORKFLOWS.values()) for n in g.nodes}
    types |= {t for t in info if t.startswith("EditSteer")}
    defs = snapshot_defs(info, types)
    graphs = {name: f() for name, f in WORKFLOWS.items()}
    if WRITE:
        from fixtures_comfy_workflows import DEFS_FILE

        DEFS_FILE.write_text(json.dumps(defs, indent=1, sort_keys=True) + "\n")
        API_DIR.mkdir(parents=True, exist_ok=True)
        for name, g in graphs.items():
            ui = to_ui(g, defs)
            (WORKFLOWS_DIR / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            (API_DIR / f"{name}.json").write_text(json.dumps(g.api(), indent=1) + "\n")
            render_png(ui, IMAGES_DIR / f"{name}.png", title=g.title, defs=defs)
    assert load_defs() == defs, "tests/comfy_node_defs.json is stale: regenerate it (EDITSTEER_WRITE_WORKFLOWS=1)"


@requires_comfyui
@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_comfyui_validates_the_api_form(comfy, name):
    """ComfyUI's own prompt validator accepts every workflow, except for model files this machine does not have."""
    import asyncio

    import execution

    _, api = read_workflow(name)
    ok, err, _outputs, node_errors = asyncio.run(execution.validate_prompt("t", api, None))
    missing_files = []
    for nid, e in node_errors.items():
        for item in e["errors"]:
            extra = item.get("extra_info", {})
            if item["type"] == "value_not_in_list" and (api[nid]["class_type"], extra.get("input_name")) in {
                    ("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
                    ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"), ("EditSteerCriticLoader", "critic")}:
                missing_files.append(extra.get("input_name"))
            elif item["type"] == "custom_validation_failed" and api[nid]["class_type"] == "LoadImage":
                missing_files.append("image")
            else:
                raise AssertionError(f"{name}: node {nid}: {item}")
    if name in TOY_WORKFLOWS:
        assert ok, (err, node_errors)


@requires_comfyui
@pytest.mark.skipif(not WRITE, reason="writes workflows/images/editsteer_toy_outputs.png; only with "
                                      "EDITSTEER_WRITE_WORKFLOWS=1")
def test_write_toy_outputs_picture(comfy, toy_editor_ref, toy_critic_ref):
    """The README picture of what the toy workflows produce (three held-out cases)."""
    import numpy as np
    from fixtures_comfy import node_id, prepare_toy_api
    from PIL import Image, ImageDraw

    def u8(t):
        return (t[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def big(a, s=4):
        return np.kron(a, np.ones((s, s, 1), dtype=np.uint8))

    rows = []
    for index in range(3):
        _, plain = read_workflow("editsteer_toy_edit")
        plain = prepare_toy_api(plain, toy_editor_ref)
        plain[node_id(plain, "EditSteerToyCase")]["inputs"]["index"] = index
        r0 = comfy.run_prompt(plain)
        _, stacked = read_workflow("editsteer_toy_critic_verilatent")
        stacked = prepare_toy_api(stacked, toy_editor_ref, toy_critic_ref)
        stacked[node_id(stacked, "EditSteerToyCase")]["inputs"]["index"] = index
        r1 = comfy.run_prompt(stacked)
        assert r0.success and r1.success, (r0.error, r1.error)
        case = node_id(stacked, "EditSteerToyCase")
        tiles = [r1.output(case, 0), r0.output(node_id(plain, "VAEDecode"), 0),
                 r1.output(node_id(stacked, "VAEDecode"), 0), r1.output(case, 2),
                 r1.output(node_id(stacked, "EditSteerCriticErrorMap"), 1)]
        row = np.concatenate([np.pad(big(u8(t)), ((4, 4), (4, 4), (0, 0)), constant_values=32) for t in tiles], 1)
        rows.append((row, r1.output(case, 1), r1.output(node_id(stacked, "EditSteerVeriLatentReport"), 0)))
    width = rows[0][0].shape[1]
    canvas = Image.new("RGB", (width, 24 + sum(r.shape[0] + 20 for r, _, _ in rows)), (32, 32, 36))
    dr = ImageDraw.Draw(canvas)
    heads = ["source", "toy editor", "+ critic + VeriLatent", "exact target", "critic error map"]
    for i, h in enumerate(heads):
        dr.text((i * (width // len(heads)) + 6, 6), h, fill=(230, 230, 230))
    y = 24
    for row, instruction, nfe in rows:
        dr.text((6, y), f"{instruction}   (search NFE {nfe})", fill=(200, 220, 200))
        canvas.paste(Image.fromarray(row), (0, y + 16))
        y += row.shape[0] + 20
    canvas.save(IMAGES_DIR / "editsteer_toy_outputs.png", optimize=True)

"""MLN's ComfyUI nodes and workflow in a real ComfyUI (skipped without COMFYUI_PATH; see tests/comfy_harness.py)."""

import json

import pytest
from comfy_harness import comfy, comfy_server, load_workflow, requires_comfyui  # noqa: F401

pytestmark = requires_comfyui

NODE_IDS = ("EditSteerSwittiLoader", "EditSteerMLNEdit", "EditSteerMLNToyCase")


def test_mln_nodes_are_registered(comfy):
    for node_id in NODE_IDS:
        schema = comfy.node_class(node_id).GET_SCHEMA()
        assert schema.category == "EditSteer/MLN"
    edit = comfy.node_class("EditSteerMLNEdit").GET_SCHEMA()
    assert [o.io_type for o in edit.outputs] == ["IMAGE", "MASK"]
    assert edit.inputs[0].io_type == "EDITSTEER_SWITTI"


def test_api_workflow_runs_on_cpu_with_progress_and_previews(comfy):
    import comfy.utils as cu

    calls = []
    old = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(lambda value, total, preview, **kw: calls.append((value, total, preview)))
    try:
        res = comfy.run_prompt(load_workflow("api/editsteer_mln_toy.json"))
    finally:
        cu.set_progress_bar_global_hook(old)
    assert res.success, res.error
    image, mask = res.output("3", 0), res.output("3", 1)
    assert tuple(image.shape) == (1, 32, 32, 3) and tuple(mask.shape) == (1, 32, 32)
    assert 0 < float(mask.mean()) < 1
    saved = list((comfy.base / "output").glob("editsteer_mln_*.png"))
    assert saved, "SaveImage wrote nothing"
    # one progress step per scale of the toy model (6), a preview from the first edited scale on: the toy preset
    # copies no scale, so every step has one
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5, 6] and {c[1] for c in calls} == {6}
    assert all(c[2] is not None and c[2][0] == "JPEG" for c in calls)


def test_interrupt_stops_the_edit(comfy):
    import comfy.model_management as mm
    import comfy.utils as cu

    old = cu.PROGRESS_BAR_HOOK

    def hook(value, total, preview, **kw):
        if value == 3:
            mm.interrupt_current_processing(True)

    cu.set_progress_bar_global_hook(hook)
    prompt = load_workflow("api/editsteer_mln_toy.json")
    prompt["3"]["inputs"]["seed"] = 7  # not cached from the previous test
    try:
        res = comfy.run_prompt(prompt)
    finally:
        cu.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert not res.success
    assert any(event == "execution_interrupted" for event, _ in comfy.executor.status_messages)


def test_ui_workflow_matches_its_api_twin(comfy):
    ui = load_workflow("editsteer_mln_toy.json")
    api = load_workflow("api/editsteer_mln_toy.json")
    assert sorted(n["type"] for n in ui["nodes"]) == sorted(v["class_type"] for v in api.values())
    for n in ui["nodes"]:
        assert n["type"] in comfy.nodes.NODE_CLASS_MAPPINGS, n["type"]
    # every UI link joins existing slots with matching types
    by_id = {n["id"]: n for n in ui["nodes"]}
    for lid, src, s_slot, dst, d_slot, typ in ui["links"]:
        assert by_id[src]["outputs"][s_slot]["type"] == typ
        assert any(i.get("link") == lid and i["type"] == typ for i in by_id[dst]["inputs"])
    # the MLN node's widget values follow its schema's widget inputs (+ the seed's control value)
    edit = next(n for n in ui["nodes"] if n["type"] == "EditSteerMLNEdit")
    schema = comfy.node_class("EditSteerMLNEdit").GET_SCHEMA()
    widgets = [i.id for i in schema.inputs if i.io_type in ("STRING", "INT", "FLOAT", "BOOLEAN", "COMBO")]
    assert len(edit["widgets_values"]) == len(widgets) + 1  # control_after_generate after the seed
    json.dumps(ui)


def test_bad_mask_batch_is_refused_clearly(comfy):
    import torch

    from comfy_nodes.nodes_mln import load_switti, run_mln
    from diffusers_ext.errors import EditSteerConfigError

    switti = load_switti("toy-switti (bundled, 32 px)")
    img = torch.rand(2, 32, 32, 3)
    with pytest.raises(EditSteerConfigError, match="MASK batch 3"):
        run_mln(switti, img, "a red circle", "a blue circle", 0, mask=torch.ones(3, 32, 32))
    with pytest.raises(EditSteerConfigError, match="mask has shape"):
        run_mln(switti, img[:1], "a red circle", "a blue circle", 0, mask=torch.ones(1, 20, 20))


def test_api_workflow_runs_on_a_loopback_server(comfy_server):
    hist = comfy_server.post_prompt(load_workflow("api/editsteer_mln_toy.json"), timeout=600)
    assert hist["status"]["status_str"] == "success", hist["status"]
    saved = [img["filename"] for out in hist["outputs"].values() for img in out.get("images", [])]
    assert any(f.startswith("editsteer_mln_") for f in saved) and any("mask" in f for f in saved)


def test_toy_case_node_captions_follow_the_bench(comfy):
    """The toy case node gives the bench's focus captions by default and the world's full captions on request."""
    from diffusers_ext.mln.captions import case_captions
    from diffusers_ext.toy import world

    node = comfy.node_class("EditSteerMLNToyCase")
    case = world.make_case("heldout", 0, 3)
    focus = node.execute("heldout", 3, 0)
    full = node.execute("heldout", 3, 0, captions="full")
    assert tuple(focus.result[1:3]) == case_captions(case, "focus")
    assert tuple(full.result[1:3]) == (case.source_caption, case.target_caption)
    assert focus.result[1:3] != full.result[1:3]


def run_toy_edit(comfy, seed: int, name: str, value):
    """Run the shipped toy MLN workflow with the edit node's input ``name`` set to ``value`` (None: left out, as in a
    prompt saved before the input existed); returns the run (outputs by node id)."""
    prompt = load_workflow("api/editsteer_mln_toy.json")
    prompt["3"]["inputs"]["seed"] = seed
    if value is None:
        prompt["3"]["inputs"].pop(name, None)
    else:
        prompt["3"]["inputs"][name] = value
    res = comfy.run_prompt(prompt)
    assert res.success, res.error
    return res


def test_anchor_input_overrides_the_preset(comfy):
    """``anchor`` "preset" keeps the toy preset's residual anchor; "tokens" switches to the official fixed tokens and
    changes the edit; an API prompt without the input (saved before it existed) still runs as "preset"."""
    import torch

    outs = {a: run_toy_edit(comfy, 11, "anchor", a).output("3", 0) for a in ("preset", "residual", "tokens", None)}
    assert torch.equal(outs["preset"], outs["residual"]) and torch.equal(outs[None], outs["preset"])
    assert not torch.equal(outs["tokens"], outs["residual"])


def test_variant_input_runs_the_fast_variant(comfy):
    """``variant`` "fast" is the pipeline with ``MLNConfig.fast()`` of the preset (same image, same seed) and a
    different edit from "paper"; an API prompt without the input runs as "paper"; a bad value is refused."""
    import torch

    from comfy_nodes.nodes_mln import load_switti, run_mln
    from diffusers_ext.errors import EditSteerConfigError
    from diffusers_ext.mln import MLNConfig

    runs = {v: run_toy_edit(comfy, 13, "variant", v) for v in ("paper", "fast", None)}
    image, source, target = (runs["fast"].output("1", i) for i in range(3))
    assert torch.equal(runs[None].output("3", 0), runs["paper"].output("3", 0))
    assert not torch.equal(runs["fast"].output("3", 0), runs["paper"].output("3", 0))
    switti = load_switti("toy-switti (bundled, 32 px)")
    direct = switti.load()(image[0].permute(2, 0, 1), source, target, config=MLNConfig.preset("toy").fast(),
                           seed=13, output_type="pt")
    assert torch.allclose(runs["fast"].output("3", 0)[0], direct.images[0].permute(1, 2, 0).float(), atol=1e-6)
    assert torch.equal(runs["fast"].output("3", 1)[0], direct.masks[0].float())
    with pytest.raises(EditSteerConfigError, match="variant must be one of"):
        run_mln(switti, image, source, target, 0, variant="quick")


def test_switti_is_under_comfyui_model_management(comfy):
    """The loader's Switti is one of ComfyUI's managed models, so ComfyUI can evict it for the next model of a
    workflow: an edit loads it fully (weights of every component counted); "free model memory"
    (``unload_all_models``) unloads it; after a partial unload (what ``free_memory`` does when it needs only part of
    a model's memory) the next edit loads it fully again; the edits agree."""
    import comfy.model_management as mm
    import torch

    from comfy_nodes.nodes_mln import load_switti, run_mln
    from diffusers_ext.mln.captions import case_captions
    from diffusers_ext.toy import world

    case = world.make_case("heldout", 0, 5)
    image = torch.from_numpy(case.source.astype("float32") / 255.0)[None]
    source, target = case_captions(case, "focus")
    switti = load_switti("toy-switti (bundled, 32 px)")
    patcher, pipe = switti.patcher, switti.pipe
    parts = (pipe.transformer, pipe.vqvae, pipe.text_encoder, pipe.text_encoder_2)
    weights = sum(t.numel() * t.element_size() for m in parts for t in m.state_dict().values())
    assert patcher.model_size() == weights > 0
    assert patcher not in mm.loaded_models() and patcher.loaded_size() == 0
    assert type(patcher.model).__name__ == "MLNPipeline"  # the name in ComfyUI's "Requested to load ..." line

    first = run_mln(switti, image, source, target, 5)
    assert patcher in mm.loaded_models() and patcher.loaded_size() == patcher.model_size()
    assert all(p.device == patcher.load_device for p in pipe.transformer.parameters())

    mm.unload_all_models()
    assert patcher not in mm.loaded_models() and patcher.loaded_size() == 0
    second = run_mln(switti, image, source, target, 5)
    assert patcher.loaded_size() == patcher.model_size()

    freed = patcher.partially_unload(patcher.offload_device, memory_to_free=patcher.model_size() // 2)
    assert 0 < freed < patcher.model_size() and patcher.loaded_size() == patcher.model_size() - freed
    third = run_mln(switti, image, source, target, 5)
    assert patcher.loaded_size() == patcher.model_size()
    for out in (second, third):
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])

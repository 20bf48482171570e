"""AnchorEdit's ComfyUI nodes in a real ComfyUI (skipped, with the reason, without COMFYUI_PATH)."""

import copy

import numpy as np
import pytest
import torch

from comfy_harness import comfy, comfy_server, load_workflow, requires_comfyui  # noqa: F401

pytestmark = requires_comfyui

WORKFLOW = "api/editsteer_anchoredit_toy.json"


@pytest.fixture(scope="module")
def nodes(comfy):  # noqa: F811
    import importlib

    return importlib.import_module("comfy_nodes.nodes_anchoredit")


@pytest.fixture(scope="module")
def tiny_model(comfy, nodes):  # noqa: F811
    """A random small AnchorEdit pipeline in ComfyUI's models/editsteer/ folder."""
    from fixtures_anchoredit import small_pipeline

    small_pipeline().save_pretrained(comfy.base / "models" / "editsteer" / "tiny-anchoredit")
    assert "tiny-anchoredit" in nodes._model_choices()
    return nodes.load_model("tiny-anchoredit")


def _image(color=(15, 15, 15)):
    return torch.tensor(color, dtype=torch.float32).div(255).view(1, 1, 1, 3).expand(1, 32, 32, 3).clone()


def test_shipped_workflow_runs_three_turns_and_saves_the_session(comfy, tmp_path):  # noqa: F811
    prompt = load_workflow(WORKFLOW)
    turns = [k for k, v in prompt.items() if v["class_type"] == "EditSteerAnchorEditTurn"]
    assert len(turns) >= 3
    res = comfy.run_prompt(prompt)
    assert res.success, res.error
    history = res.output("7")
    assert tuple(history.shape) == (len(turns) + 1, 32, 32, 3)
    session = res.output(turns[-1], 0)
    assert session.turns == len(turns) and res.output(turns[-1], 2) == len(turns)
    saved = res.output("9")
    assert saved.endswith("_00001")

    load = {"1": prompt["1"], "2": {"class_type": "EditSteerAnchorEditLoadSession",
                                    "inputs": {"model": ["1", 0], "path": saved.rsplit("/", 1)[-1]}},
            "3": {"class_type": "EditSteerAnchorEditTurn",
                  "inputs": {"session": ["2", 0], "instruction": "remove the blue circle", "seed": -1,
                             "preview": False}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}}
    res2 = comfy.run_prompt(load)
    assert res2.success, res2.error
    ref = session.fork().edit("remove the blue circle", output_type="np")
    got = (res2.output("3", 1)[0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, ref)  # the loaded session continues exactly like the one that was saved


def test_resume_workflow_continues_the_saved_session(comfy):  # noqa: F811
    """The shipped resume workflow loads the session the toy workflow saved, undoes its last turn and edits again:
    the same images as undoing and editing the saved session in Python."""
    from diffusers_ext.anchoredit import AnchorEditSession

    from comfy_nodes.nodes_anchoredit import EditSteerAnchorEditLoadSession, load_model

    res = comfy.run_prompt(load_workflow(WORKFLOW))  # saves (or re-saves) the toy session
    assert res.success, res.error
    prompt = load_workflow("api/editsteer_anchoredit_resume.json")
    path = res.output("9").rsplit("/", 1)[-1]
    loader = next(k for k, n in prompt.items() if n["class_type"] == "EditSteerAnchorEditLoadSession")
    prompt[loader]["inputs"]["path"] = path  # the name this run saved under
    turn = next(k for k, n in prompt.items() if n["class_type"] == "EditSteerAnchorEditTurn")
    hist = next(k for k, n in prompt.items() if n["class_type"] == "EditSteerAnchorEditHistory")
    res2 = comfy.run_prompt(prompt)
    assert res2.success, res2.error
    history = res2.output(hist)
    assert tuple(history.shape) == (4, 32, 32, 3)  # source + turns 1, 2 + the new turn 3
    session = AnchorEditSession.load(load_model("toy-anchoredit"), EditSteerAnchorEditLoadSession._resolve(path))
    session.undo(1)
    ref = session.edit(prompt[turn]["inputs"]["instruction"], output_type="np")
    got = (res2.output(turn, 1)[0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, ref)


def test_turn_node_forks_reports_progress_and_honours_interrupt(comfy, nodes, tiny_model):  # noqa: F811
    import comfy.model_management as mm
    import comfy.utils

    session, source = nodes.EditSteerAnchorEditStart.execute(tiny_model, _image(), 3, "model default", 24).args
    assert tuple(source.shape) == (1, 32, 32, 3)
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append((v, t, preview)))
    try:
        new, image, turn = nodes.EditSteerAnchorEditTurn.execute(session, "add a red circle at the center", -1,
                                                                 True).args
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert session.turns == 0 and new.turns == 1 and turn == 1  # the input session is untouched
    steps = len(tiny_model.sampler_config.timesteps)
    assert [v for v, _, _ in seen] == list(range(1, steps + 1)) and all(p is not None for _, _, p in seen)
    before = copy.deepcopy((new.instructions, [x.clone() for x in new.latents], new.cache.frames))
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes.EditSteerAnchorEditTurn.execute(new, "make the red circle blue", -1, False)
    finally:
        mm.interrupt_current_processing(False)
    assert new.instructions == before[0] and new.cache.frames == before[2]
    assert all(torch.equal(a, b) for a, b in zip(new.latents, before[1]))
    undone, img = nodes.EditSteerAnchorEditUndo.execute(new, 1).args
    assert undone.turns == 0 and new.turns == 1
    images, text = nodes.EditSteerAnchorEditHistory.execute(new).args
    assert images.shape[0] == 2 and text.startswith("1: add a red circle")


def test_model_is_under_comfyui_model_management(comfy, nodes, tiny_model):  # noqa: F811
    """The AnchorEdit model is one of ComfyUI's managed models: starting a session loads it, "free model memory"
    (``unload_all_models``) unloads it, and the next turn loads it back and edits as if nothing had happened."""
    import comfy.model_management as mm

    managed = next(m for m in nodes._MODELS.values() if m.pipe is tiny_model)
    mm.unload_all_models()
    assert managed.patcher not in mm.loaded_models() and managed.patcher.loaded_size() == 0
    session, _ = nodes.EditSteerAnchorEditStart.execute(tiny_model, _image(), 5, "model default", 24).args
    assert managed.patcher in mm.loaded_models()
    assert managed.patcher.loaded_size() == managed.patcher.model_size() > 0
    ref = session.fork().edit("add a red circle at the center", output_type="np")
    mm.unload_all_models()
    assert managed.patcher not in mm.loaded_models()
    new, image, _ = nodes.EditSteerAnchorEditTurn.execute(session, "add a red circle at the center", -1, False).args
    assert managed.patcher in mm.loaded_models()
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), ref)


def test_a_chain_of_turn_nodes_holds_one_cache(comfy, nodes, tiny_model):  # noqa: F811
    """ComfyUI keeps every node's output session alive: turn nodes that clone the KV cache make a chain of N turns
    hold N + 1 caches. Each turn hands the cache on to its output; the images are a plain session's, and re-running
    a middle turn (a changed instruction) rebuilds that input's cache and gives the plain session's result."""
    texts = ["add a red circle at the center", "make the red circle blue", "add a green square", "remove the circle"]
    chain = [nodes.EditSteerAnchorEditStart.execute(tiny_model, _image(), 7, "model default", 24).args[0]]
    images = []
    for text in texts:
        new, image, _ = nodes.EditSteerAnchorEditTurn.execute(chain[-1], text, -1, False).args
        chain.append(new)
        images.append((image[0].numpy() * 255).round().astype(np.uint8))
    plain = tiny_model.start_session(nodes._to_uint8(_image()), seed=7)
    for text, image in zip(texts, images):
        assert np.array_equal(image, plain.edit(text, output_type="np"))
    assert [s.turns for s in chain] == [0, 1, 2, 3, 4]
    assert sum(s.cache_bytes() for s in chain) == chain[-1].cache_bytes() == plain.cache_bytes() > 0
    _, image, turn = nodes.EditSteerAnchorEditTurn.execute(chain[2], "make the circle green", -1, False).args
    branch = tiny_model.start_session(nodes._to_uint8(_image()), seed=7)
    for text in texts[:2]:
        branch.edit(text)
    assert turn == 3 and np.array_equal((image[0].numpy() * 255).round().astype(np.uint8),
                                        branch.edit("make the circle green", output_type="np"))
    undone, image = nodes.EditSteerAnchorEditUndo.execute(chain[4], 2).args
    assert undone.turns == 2 and chain[4].turns == 4 and not chain[4].holds_cache
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), chain[2].image)


def test_gpu_loading_keeps_diffusers_float32_modules(comfy, nodes, tmp_path):  # noqa: F811
    """For a GPU the model node loads bf16 through ``from_pretrained(dtype=...)``, which keeps RoPE, the time
    embedder, the modulation tables and the norms in fp32; ``pipe.to(torch.bfloat16)`` cast them too, an error
    that grew every turn. (The pipeline is only built here, on the offload device: no GPU needed.)"""
    from fixtures_anchoredit import small_pipeline

    small_pipeline().save_pretrained(tmp_path / "m")
    pipe = nodes._load_pipeline(str(tmp_path / "m"), torch.device("cuda"), torch.device("cpu"))
    keep = set(pipe.transformer._keep_in_fp32_modules)
    tensors = [*pipe.transformer.named_parameters(), *pipe.transformer.named_buffers()]
    kept = [n for n, t in tensors if keep & set(n.split("."))]
    assert any(n.startswith("rope.") for n in kept) and any("time_embedder" in n for n in kept)
    for name, t in tensors:
        assert t.dtype == (torch.float32 if name in kept else torch.bfloat16), name
    assert pipe.transformer.device.type == "cpu"
    cpu = nodes._load_pipeline(str(tmp_path / "m"), torch.device("cpu"), torch.device("cpu"))
    assert cpu.transformer.dtype == torch.float32 and cpu.transformer.proj_out.weight.dtype == torch.float32


def test_bad_inputs_are_clear_errors(comfy, nodes, tiny_model):  # noqa: F811
    from diffusers_ext.errors import EditSteerConfigError

    with pytest.raises(EditSteerConfigError, match="patch grid"):
        nodes.EditSteerAnchorEditStart.execute(tiny_model, torch.zeros(1, 30, 32, 3), 0, "model default", 24)
    session, _ = nodes.EditSteerAnchorEditStart.execute(tiny_model, _image(), 0, "model default", 24).args
    saved = nodes.EditSteerAnchorEditSaveSession.execute(session, "tiny", True).args[0]
    toy = nodes.load_model("toy-anchoredit")
    from diffusers_ext.errors import ModelFamilyError

    with pytest.raises((ModelFamilyError, EditSteerConfigError)):
        nodes.EditSteerAnchorEditLoadSession.execute(toy, saved)


def test_ui_workflow_matches_its_api_twin(comfy):  # noqa: F811
    """The UI-format file (what users drag in) describes the same graph as the API file the tests execute."""
    ui = load_workflow("editsteer_anchoredit_toy.json")
    api = load_workflow(WORKFLOW)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {lk[0]: lk for lk in ui["links"]}
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        for inp in node["inputs"]:  # every socket input is the same link as in the API graph
            _, src, slot, dst, _, _ = links[inp["link"]]
            assert inputs[inp["name"]] == [str(src), slot] and dst == node["id"]
        schema = comfy.node_class(node["type"])
        names = [n for n, spec in {**schema.INPUT_TYPES().get("required", {}),
                                   **schema.INPUT_TYPES().get("optional", {})}.items()
                 if not isinstance(inputs.get(n), list)]
        values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == [inputs[n] for n in names], node["type"]


def test_api_workflow_runs_on_a_comfyui_server(comfy_server):  # noqa: F811
    entry = comfy_server.post_prompt(load_workflow(WORKFLOW), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["8"]["images"]
    assert len(saved) == 4  # the source and three turns

"""The pack loads in a real ComfyUI (skipped without COMFYUI_PATH)."""

from comfy_harness import OTHER_PACK_NODE, PACK_DIR_NAME, comfy, comfy_server, requires_comfyui  # noqa: F401

pytestmark = requires_comfyui


def test_pack_loads_as_custom_node(comfy):
    import folder_paths

    from diffusers_ext.weights import search_dirs

    assert "editsteer" in folder_paths.folder_names_and_paths
    registered = [str(p) for _, p in search_dirs()]
    assert any(p.endswith("editsteer") for p in registered)
    ours = [k for k in comfy.nodes.NODE_CLASS_MAPPINGS if k.startswith("EditSteer")]
    # the nodes live under the pack's own package, never under the top-level name comfy_nodes that other packs use
    modules = {comfy.node_class(k).__module__ for k in ours}
    assert ours and all(m.endswith(tuple(f"{PACK_DIR_NAME}.comfy_nodes.{n}" for n in ("nodes_toy", "nodes_critic",
                        "nodes_verilatent", "nodes_mln", "nodes_anchoredit"))) for m in modules), modules
    for node_id in ours:  # every node has a category of its own and a tooltip on every input
        schema = comfy.node_class(node_id).GET_SCHEMA()
        assert schema.category.startswith("EditSteer")
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{node_id}.{inp.id} has no tooltip"


def test_server_starts_with_pack(comfy_server):
    log = comfy_server.log.read_text()
    pack_lines = [ln for ln in log.splitlines() if ln.rstrip().endswith("/EditSteer")]
    assert pack_lines, f"EditSteer was not in ComfyUI's custom node import list:\n{log[-3000:]}"
    assert not any("IMPORT FAILED" in ln for ln in pack_lines), pack_lines
    info = comfy_server.get("/object_info")
    assert "KSampler" in info  # the server answers with its node registry
    # another pack with a top-level comfy_nodes package of its own, loaded first: both packs load
    assert OTHER_PACK_NODE in info and "EditSteerMLNEdit" in info and "EditSteerApplyCritic" in info

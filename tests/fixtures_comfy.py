"""Fixtures and helpers shared by the real-ComfyUI tests of EditSteer's nodes (``tests/test_comfy_*.py``).

Import what you use explicitly::

    from fixtures_comfy import toy_editor_ref, toy_critic_ref, prepare_toy_api  # noqa: F401
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

TOY_ID = "toy-kontext-editor"
TOY_CRITIC_ID = "toy-critic"


def _resolves(artifact_id: str) -> bool:
    from diffusers_ext.errors import EditSteerError
    from diffusers_ext.weights import resolve

    try:
        resolve(artifact_id)
        return True
    except EditSteerError:
        return False


def build_standin_editor(folder: Path) -> Path:
    """A tiny random FluxKontextPipeline over the toy vocabulary (stands in until the trained toy editor exists)."""
    from diffusers_ext.tiny import TinyKontextConfig, tiny_kontext_pipeline
    from diffusers_ext.toy import world
    from diffusers_ext.toy.editor import write_settings

    if not (folder / "model_index.json").is_file():
        tiny_kontext_pipeline(TinyKontextConfig(words=tuple(world.vocabulary()))).save_pretrained(folder)
        write_settings(folder)
    return folder


@pytest.fixture(scope="session")
def toy_editor_ref(tmp_path_factory) -> str:
    """What the toy workflows' ``editor`` input should hold here: ``$EDITSTEER_TOY_EDITOR`` (a toy editor folder) when
    set, else the trained toy editor's id when it resolves, else the folder of a tiny random stand-in of the same
    classes."""
    if os.environ.get("EDITSTEER_TOY_EDITOR"):
        return os.environ["EDITSTEER_TOY_EDITOR"]
    if _resolves(TOY_ID):
        return TOY_ID
    return str(build_standin_editor(tmp_path_factory.mktemp("toy-standin") / "pipeline"))


def random_critic(transformer, seed: int = 0, **overrides):
    """An untrained InlineCritic sized for ``transformer`` with non-zero adapters (exercises every code path)."""
    from diffusers_ext.critic import InlineCritic, critic_config_for

    torch.manual_seed(seed)
    d = len(transformer.transformer_blocks) + len(getattr(transformer, "single_transformer_blocks", []))
    kw = {"l_in": 0, "l_c": tuple(range(max(0, d - 2), d)), "adapter_rank": 2, "mode": "steer", **overrides}
    critic = InlineCritic(critic_config_for(transformer, **kw))
    with torch.no_grad():
        critic.tokens.normal_(0, 1.0)
        for a in critic.adapters.values():
            a.up.normal_(0, 0.05)
        for g in critic.gates.values():
            g.normal_(0, 1.0)
        for a in critic.steer_adapters.values():
            a.up.normal_(0, 0.05)
            if a.film is not None:
                a.film.normal_(0, 0.05)
    return critic.eval()


@pytest.fixture(scope="session")
def toy_critic_ref(comfy, toy_editor_ref) -> str:
    """What the ``critic`` input of the toy workflows should hold here: the trained toy critic's id when it
    resolves, else a random critic for the toy editor saved in ComfyUI's models/editsteer folder."""
    if _resolves(TOY_CRITIC_ID) and toy_editor_ref == TOY_ID:
        return TOY_CRITIC_ID
    from diffusers_ext.toy.editor import load_toy_editor

    pipe, _ = load_toy_editor(toy_editor_ref)
    path = comfy.base / "models" / "editsteer" / "test-toy-critic" / "critic.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    random_critic(pipe.transformer).save_weights(path)
    return "test-toy-critic/critic.safetensors"


def prepare_toy_api(api: dict, editor: str, critic: str | None = None) -> dict:
    """A copy of a toy API workflow pointing at this machine's toy editor (and critic)."""
    api = copy.deepcopy(api)
    for node in api.values():
        if node["class_type"] == "EditSteerToyEditorLoader":
            node["inputs"]["editor"] = editor
        if node["class_type"] == "EditSteerCriticLoader" and critic is not None:
            node["inputs"]["critic"] = critic
    return api


def node_id(api: dict, class_type: str, n: int = 0) -> str:
    """The id of the ``n``-th node of ``class_type`` in an API workflow."""
    ids = sorted((k for k, v in api.items() if v["class_type"] == class_type), key=int)
    return ids[n]


def comfy_velocity(model_patcher, x, sigma, context, **kwargs) -> torch.Tensor:
    """One forward of a MODEL's diffusion model with its patches and wrappers, as sampling runs it (conditional)."""
    import comfy.patcher_extension as pe

    to = pe.copy_nested_dicts(model_patcher.model_options["transformer_options"])
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), model_patcher.wrappers, copy_dict1=False)
    to["cond_or_uncond"] = [0] * 1
    to["sigmas"] = sigma
    with torch.no_grad():
        return model_patcher.model.diffusion_model(x, sigma, context, transformer_options=to, **kwargs)


def comfy_qwen_from_diffusers(transformer):
    """A ComfyUI MODEL of ComfyUI's own Qwen-Image class with a diffusers ``QwenImageTransformer2DModel``'s weights
    (same key names); ComfyUI's detection assumes the full-size widths, so tests build the config themselves."""
    import comfy.model_patcher
    import comfy.supported_models

    c = transformer.config
    unet = {"image_model": "qwen_image", "patch_size": c.patch_size, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "num_layers": c.num_layers, "attention_head_dim": c.attention_head_dim,
            "num_attention_heads": c.num_attention_heads, "joint_attention_dim": c.joint_attention_dim,
            "axes_dims_rope": tuple(c.axes_dims_rope)}
    cfg = comfy.supported_models.QwenImage(unet)
    cfg.set_inference_dtype(torch.float32, None)
    if c.out_channels != cfg.latent_format.latent_channels:  # a tiny VAE: identity scaling, video-shaped latents
        import comfy.latent_formats

        fmt = comfy.latent_formats.LatentFormat()
        fmt.latent_channels, fmt.latent_dimensions = c.out_channels, 3
        cfg.latent_format = fmt
    model = cfg.get_model({}, "")
    missing, unexpected = model.diffusion_model.load_state_dict(transformer.state_dict(), strict=True)
    assert not missing and not unexpected
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


#: Cross-backend numbers measured by the tests (relative errors), written to ``$EDITSTEER_PARITY_OUT`` when set:
#: ``EDITSTEER_PARITY_OUT=parity.json <ComfyUI test command> tests/test_comfy_*.py``.
PARITY: dict[str, float] = {}


def record(name: str, value: float) -> float:
    PARITY[name] = float(value)
    return float(value)


@pytest.fixture(scope="session", autouse=True)
def parity_report():
    yield PARITY
    out = os.environ.get("EDITSTEER_PARITY_OUT")
    if out and PARITY:
        p = Path(out)
        old = json.loads(p.read_text()) if p.is_file() else {}
        p.write_text(json.dumps({**old, **PARITY}, indent=1, sort_keys=True) + "\n")

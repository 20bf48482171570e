"""Shared fixtures of the Inline Critic tests: tiny Kontext / Qwen transformers and their inputs, a toy-like editor
folder (tiny Kontext with toy settings), a small critic.

Imported explicitly by ``tests/test_critic_*.py`` (``from fixtures_critic import *``)."""

from __future__ import annotations

import itertools

import pytest
import torch

__all__ = ["critic_editor_dir", "critic_folder", "flux_inputs", "qwen_inputs", "tiny_flux", "tiny_qwen",
           "snapshot", "strong_steering_", "TINY_STEPS"]

TINY_STEPS = 2


def tiny_flux(seed: int = 0):
    """FluxTransformer2DModel with 2 double + 2 single blocks (depth 4), width 32 (the tiny Kontext's sizes)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def tiny_qwen(seed: int = 0):
    """QwenImageTransformer2DModel with 3 blocks, width 48 (the tiny Qwen-Edit's sizes)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()


def flux_inputs(t, batch: int = 2, grid: int = 4, text: int = 5, seed: int = 0) -> dict:
    """Kontext-style transformer inputs: grid x grid target tokens + as many reference tokens (ids axis 0 = 1)."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    ids = torch.tensor([[0, a, b] for a, b in itertools.product(range(grid), range(grid))], dtype=torch.float32)
    ref = ids.clone()
    ref[:, 0] = 1
    c = t.config
    return {"hidden_states": torch.randn(batch, 2 * n, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, c.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), 0.5), "img_ids": torch.cat([ids, ref]),
            "txt_ids": torch.zeros(text, 3), "return_dict": False}


def qwen_inputs(t, batch: int = 2, grid: int = 4, text: int = 7, seed: int = 0, pad: bool = True) -> dict:
    """Qwen-Image-Edit-style inputs; sample 1 has two padded text tokens when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    mask = torch.ones(batch, text, dtype=torch.long)
    if pad and batch > 1:
        mask[1, -2:] = 0
    c = t.config
    return {"hidden_states": torch.randn(batch, 2 * n, c.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, text, c.joint_attention_dim, generator=g),
            "encoder_hidden_states_mask": mask, "timestep": torch.full((batch,), 0.5),
            "img_shapes": [[(1, grid, grid), (1, grid, grid)]] * batch, "return_dict": False}


def strong_steering_(critic, seed: int = 0):
    """Give an untrained critic large critic keys/values (through its adapters) so that steering visibly changes a
    tiny random model's output (an untrained token gets ~1/seq of the attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in critic.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 2.0)
    return critic


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="session")
def critic_editor_dir(session_tmp):
    """A toy-editor-like pipeline folder: tiny Kontext (2 double + 2 single blocks) + editsteer_toy.json."""
    from diffusers_ext.tiny import TinyKontextConfig, tiny_kontext_pipeline
    from diffusers_ext.toy.editor import write_settings
    from diffusers_ext.toy.world import vocabulary

    out = session_tmp / "critic-tiny-editor"
    if not out.exists():
        pipe = tiny_kontext_pipeline(TinyKontextConfig(num_layers=2, num_single_layers=2,
                                                       words=tuple(vocabulary())))
        pipe.save_pretrained(out)
        write_settings(out, num_inference_steps=TINY_STEPS)
    return out


@pytest.fixture(scope="session")
def critic_folder(session_tmp, critic_editor_dir):
    """A (random, untrained) steer-mode critic for ``critic_editor_dir``, saved with save_pretrained."""
    from diffusers import FluxTransformer2DModel

    from diffusers_ext.critic import InlineCritic, critic_config_for

    out = session_tmp / "critic-tiny-critic"
    if not out.exists():
        t = FluxTransformer2DModel.from_pretrained(critic_editor_dir, subfolder="transformer")
        torch.manual_seed(0)
        critic = InlineCritic(critic_config_for(t, l_in=1, l_c=(2,), adapter_rank=2, mode="steer"))
        strong_steering_(critic)
        critic.save_pretrained(out)
    return out

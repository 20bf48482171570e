"""The bundled toy critic (``toy-critic``) on the bundled toy editor: offline, sha256-verified, and the critique
mode leaves the editor's output unchanged while producing an error map."""

import shutil

import numpy as np
import torch

from diffusers_ext.critic import InlineCritic, InlineCriticKontextPipeline
from diffusers_ext.toy import world
from diffusers_ext.toy.editor import load_toy_editor, toy_pipeline_kwargs
from diffusers_ext.weights import get_artifact, resolve

CRITIC_ID = "toy-critic"


def test_toy_critic_resolves_offline_by_id_and_is_sha256_checked(tmp_path, monkeypatch):
    art = get_artifact(CRITIC_ID)
    assert art.status == "unpublished" and art.repo_id == "editsteer/toy-critic"
    assert art.produced_by.startswith("editsteer train critic") and "training" in art.extra
    found = resolve(CRITIC_ID)
    assert found.verified and found.source == "bundled"
    assert sum(f.size for f in art.files) <= 3 * 2**20

    # a tampered copy in a registered weights folder (searched before the bundled one) is rejected by its hash
    bad = tmp_path / CRITIC_ID
    shutil.copytree(found.path, bad)
    data = bytearray((bad / "critic.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "critic.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv("EDITSTEER_WEIGHTS_DIR", str(tmp_path))
    again = resolve(CRITIC_ID)
    assert again.source == "bundled"
    assert any("sha256 mismatch" in s.outcome for s in again.searched)

    critic = InlineCritic.from_pretrained(CRITIC_ID)
    assert critic.config.arch == "flux" and critic.config.stage == 3 and critic.config.mode == "steer"


def test_toy_critic_critique_mode_keeps_the_editor_output_and_returns_an_error_map():
    pipe, _ = load_toy_editor(pipeline_cls=InlineCriticKontextPipeline)
    kw = toy_pipeline_kwargs(pipe)
    cases = [world.make_case("heldout", 0, i) for i in range(2)]
    images = [world.to_pil(c.source) for c in cases]
    prompts = [c.instruction for c in cases]

    def call(**extra):
        gens = [torch.Generator().manual_seed(i) for i in range(len(cases))]
        return pipe(image=images, prompt=prompts, generator=gens, output_type="np", **kw, **extra)

    ref = call().images  # no critic loaded: the frozen editor
    pipe.load_critic(CRITIC_ID)
    crit = call(critic_mode="critique")
    assert np.abs(crit.images - ref).max() <= 1e-6
    maps = crit.error_maps
    grid = kw["height"] // pipe.vae_scale_factor // 2
    assert maps.shape == (len(cases), grid, grid) and torch.isfinite(maps).all()
    assert float(maps.std()) > 0  # a map, not a constant
    steer = call()  # the critic's own mode: it steers the editor
    assert steer.error_maps is not None and np.abs(steer.images - ref).max() > 1e-3
    assert np.array_equal(call(critic_mode="off").images, ref)

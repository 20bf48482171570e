"""Loading Switti: official Hub layout from a hand-built HF cache (offline), diffusers layout, wrong families,
missing weights, prompt truncation."""

import json
import logging

import pytest
import torch

from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError, WeightsError
from diffusers_ext.switti import SwittiPipeline, SwittiTransformer, SwittiVQVAE, load_transformer, load_vqvae
from diffusers_ext.switti.loading import save_official_transformer, save_official_vqvae
from diffusers_ext.tiny import write_hf_cache_repo


@pytest.fixture(scope="module")
def official_layout(session_tmp):
    """Tiny checkpoints in the official repos' exact layout: config.json (SwittiHF / VQVAEHF init args) +
    model.safetensors with the official parameter names (the transformer file also carries the L x L mask)."""
    torch.manual_seed(0)
    # SwittiHF(depth=1, reso=256): width 64, one head, V = 4096, context 2048, pooled 1280 (the official constants)
    t = SwittiTransformer(depth=1, embed_dim=64, num_heads=1, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    v = SwittiVQVAE(ch=32, v_patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))  # saved at reso 1024
    root = session_tmp / "official-layout"
    return (save_official_transformer(t, root / "Switti", include_training_mask=True),
            save_official_vqvae(v, root / "VQVAE-Switti"), t, v)


def test_official_layout_loads_offline_from_the_hf_cache(hf_cache, official_layout):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    t_dir, v_dir, t_ref, v_ref = official_layout
    assert sorted(p.name for p in t_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((t_dir / "config.json").read_text())["depth"] == 1
    write_hf_cache_repo(hf_cache, "yresearch/Switti", t_dir)
    write_hf_cache_repo(hf_cache, "yresearch/VQVAE-Switti", v_dir)

    t = load_transformer("yresearch/Switti")  # via the weight manifest (switti-512), HF cache, local files only
    assert (t.config.depth, t.config.embed_dim, t.config.num_heads) == (1, 64, 1)
    for k, val in t_ref.state_dict().items():
        assert torch.equal(t.state_dict()[k], val), k
    v = load_vqvae("yresearch/VQVAE-Switti", reso=256)  # the Hub file's 14-scale statistics are resized
    assert v.v_patch_nums == t.patch_nums
    assert torch.equal(v.codebook, v_ref.codebook)
    assert v.quantize.ema_vocab_hit_SV.shape[0] == 10


def test_diffusers_layout_round_trip(tmp_path):
    from fixtures_mln import tiny_config

    from diffusers_ext.switti.tiny import tiny_switti_pipeline

    pipe = tiny_switti_pipeline(tiny_config())
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_ext.switti.transformer", "SwittiTransformer"]
    again = SwittiPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    a = pipe("a red circle", seed=3, output_type="pt").images
    b = again("a red circle", seed=3, output_type="pt").images
    assert torch.equal(a, b)
    assert isinstance(load_transformer(tmp_path / "p" / "transformer"), SwittiTransformer)


def test_dtype_and_its_deprecated_alias(official_layout):
    """``dtype=`` as diffusers >= 0.42 spells it; ``torch_dtype=`` still works with a FutureWarning; both at once is
    refused."""
    t_dir, v_dir, _, _ = official_layout
    assert load_transformer(t_dir, dtype=torch.bfloat16).word_embed.weight.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="use dtype="):
        v = load_vqvae(v_dir, reso=256, torch_dtype=torch.bfloat16)
    assert v.codebook.dtype == torch.bfloat16
    with pytest.raises(EditSteerConfigError, match="dtype= only"):
        load_transformer(t_dir, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_not_switti_checkpoints_are_refused(tmp_path, official_layout, tiny_wan_dir):
    t_dir, v_dir, _, _ = official_layout
    with pytest.raises(ModelFamilyError, match="WanTransformer3DModel"):
        load_transformer(tiny_wan_dir)
    # a VQ-VAE file under a Switti config: recognised by its tensors
    bad = tmp_path / "swapped"
    bad.mkdir()
    (bad / "config.json").write_text((t_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((v_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelFamilyError, match="not a Switti transformer checkpoint"):
        load_transformer(bad)
    # right family, wrong size: config says depth 2, file holds depth 1
    (bad / "config.json").write_text(json.dumps({"depth": 2, "reso": 256}))
    (bad / "model.safetensors").write_bytes((t_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelFamilyError, match="shape mismatches|missing"):
        load_transformer(bad)


def test_missing_weights_name_the_repo(tmp_path):
    with pytest.raises(WeightsError, match="yresearch/Switti-1024"):
        load_transformer("yresearch/Switti-1024")
    with pytest.raises(WeightsError, match="some-org/not-cached"):
        load_transformer("some-org/not-cached")
    with pytest.raises(WeightsError):
        load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFamilyError, match="config.json"):
        load_transformer(tmp_path / "empty")


def test_long_prompts_are_truncated_with_a_warning(caplog):
    from fixtures_mln import tiny_config

    from diffusers_ext.switti.tiny import tiny_switti_pipeline

    pipe = tiny_switti_pipeline(tiny_config())
    long = " and ".join(["a large red circle at the top left"] * 12)
    with caplog.at_level(logging.WARNING):
        enc = pipe.encode_prompt([long, "a red circle"])
    assert enc.embeds.shape[1] == pipe.tokenizer.model_max_length
    assert len(enc.truncated) == 1 and "truncated" in enc.truncated[0]
    assert any("truncated" in r.message for r in caplog.records)


def _hub_clip_repo(folder, hidden: int, seed: int):
    """A tiny full ``CLIPModel`` checkpoint as ``openai/clip-vit-large-patch14`` and the LAION bigG repo hold it:
    config.json (text + vision configs), model.safetensors (``text_model.*``, ``vision_model.*``, projections), and
    the CLIP tokenizer's files. ``hidden`` is the real text width (768 / 1280), which Switti's context needs."""
    from transformers import CLIPConfig, CLIPModel

    from diffusers_ext.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    tok = build_clip_tokenizer(["a", "red", "circle"])
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=16)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_official_checkpoints_build_a_pipeline_offline(hf_cache, official_layout, tmp_path):
    """``SwittiPipeline.from_switti_checkpoints`` with the four official repos in a hand-built HF cache (their
    defaults, no arguments): the text encoders are the CLIP checkpoints' text towers, value for value, and the
    pipeline generates. A CLIP checkpoint that lacks a text weight is refused by name instead of running with a
    randomly initialised encoder (transformers only warns)."""
    from safetensors.torch import load_file, save_file

    from diffusers_ext.switti import load_text_encoders

    t_dir, v_dir, _, _ = official_layout
    write_hf_cache_repo(hf_cache, "yresearch/Switti", t_dir)
    write_hf_cache_repo(hf_cache, "yresearch/VQVAE-Switti", v_dir)
    towers = {}
    for repo, hidden, seed in (("openai/clip-vit-large-patch14", 768, 1),
                               ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", 1280, 2)):
        towers[repo] = _hub_clip_repo(tmp_path / repo, hidden, seed).text_model.state_dict()
        keys = load_file(tmp_path / repo / "model.safetensors")
        assert any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys)
        write_hf_cache_repo(hf_cache, repo, tmp_path / repo)

    pipe = SwittiPipeline.from_switti_checkpoints()
    for encoder, repo in ((pipe.text_encoder, "openai/clip-vit-large-patch14"),
                          (pipe.text_encoder_2, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")):
        state = encoder.state_dict()
        for name, value in towers[repo].items():  # transformers < 5.6 keeps the text_model wrapper
            assert torch.equal(state[name if name in state else f"text_model.{name}"], value), (repo, name)
    image = pipe("a red circle", seed=0, output_type="pt").images
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()

    broken = tmp_path / "broken-clip"
    _hub_clip_repo(broken, 768, 1)
    tensors = load_file(broken / "model.safetensors")
    del tensors["text_model.final_layer_norm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 of \d+ weights are not in the checkpoint.*final_layer_norm"):
        load_text_encoders(broken, tmp_path / "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")

"""The weights manifest and the local-first, hash-checked resolver."""

import json
import os

import pytest
import torch

from diffusers_ext.errors import UnsafeWeightsError, WeightsError
from diffusers_ext.tiny import write_hf_cache_repo
from diffusers_ext.weights import (
    Artifact,
    entry_from_folder,
    load_manifest,
    load_safetensors,
    register_search_dir,
    resolve,
    save_safetensors,
    unregister_search_dir,
    write_entry,
)
from diffusers_ext.weights import resolver as resolver_mod


@pytest.fixture
def artifact_files(tmp_path):
    """A one-file artifact on disk plus its manifest entry (status published, pinned revision)."""
    src = tmp_path / "src"
    save_safetensors({"w": torch.arange(64, dtype=torch.float32)}, src / "critic.safetensors", {"arch": "test"})
    art = entry_from_folder(src, id="test-critic", description="test", kind="safetensors", base_model="flux-kontext",
                            license="apache-2.0", status="published", repo_id="editsteer-test/critic",
                            revision="a" * 40)
    return src, art


@pytest.fixture
def clean_search_dirs():
    saved = {k: list(v) for k, v in resolver_mod._SEARCH_DIRS.items()}
    resolver_mod._SEARCH_DIRS.clear()
    yield
    resolver_mod._SEARCH_DIRS.clear()
    resolver_mod._SEARCH_DIRS.update(saved)


def _place(folder, art, src):
    d = folder / art.id
    d.mkdir(parents=True, exist_ok=True)
    (d / art.main_file.path).write_bytes((src / art.main_file.path).read_bytes())
    return d / art.main_file.path


def test_shipped_manifest_entries_are_valid():
    arts = load_manifest()
    for art in arts.values():
        art.validate()
        if art.status == "published":  # nothing claims a Hub file without a pinned revision
            assert art.revision and len(art.revision) == 40


def test_manifest_validation_rejects_bad_entries(artifact_files):
    _, art = artifact_files
    d = art.to_json()
    bad = dict(d, status="published", revision=None)
    with pytest.raises(ValueError, match="40-hex revision"):
        Artifact.from_json(bad)
    bad = dict(d, status="unpublished", revision=None, files=[{"path": "critic.safetensors"}])
    with pytest.raises(ValueError, match="needs sha256 and size"):
        Artifact.from_json(bad)
    bad = dict(d, files=[{"path": "../x.safetensors", "sha256": "0" * 64, "size": 1}])
    with pytest.raises(ValueError, match="inside the artifact"):
        Artifact.from_json(bad)


def test_resolution_order(tmp_path, artifact_files, clean_search_dirs, monkeypatch):
    src, art = artifact_files
    comfy_dir, assets, cache = tmp_path / "comfy_models", tmp_path / "assets", tmp_path / "hf"
    art = Artifact.from_json({**art.to_json(), "bundled_path": "test-critic"})
    explicit = _place(tmp_path / "explicit", art, src)
    registered = _place(comfy_dir, art, src)
    bundled = _place(assets, art, src)
    monkeypatch.setattr(resolver_mod, "assets_dir", lambda: assets)
    write_hf_cache_repo(cache, art.repo_id, src, revision=art.revision)
    register_search_dir(comfy_dir, label="comfyui models")

    assert resolve(art, path=explicit, hf_cache_dir=cache).source == "explicit path"
    found = resolve(art, hf_cache_dir=cache)
    assert (found.source, found.path) == ("comfyui models", registered)
    registered.unlink()
    found = resolve(art, hf_cache_dir=cache)
    assert (found.source, found.path) == ("bundled", bundled)
    bundled.unlink()
    found = resolve(art, hf_cache_dir=cache)
    assert found.source == "hf cache" and found.verified
    assert found.path.read_bytes() == (src / "critic.safetensors").read_bytes()
    unregister_search_dir(comfy_dir)
    assert torch.equal(load_safetensors(found.path)["w"], torch.arange(64, dtype=torch.float32))


def test_tampered_copy_is_never_loaded(tmp_path, artifact_files, clean_search_dirs, caplog):
    src, art = artifact_files
    d = tmp_path / "models"
    f = _place(d, art, src)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed in the tensor data
    f.write_bytes(bytes(data))
    register_search_dir(d, label="comfyui models")
    with pytest.raises(WeightsError) as e:
        resolve(art, hf_cache_dir=tmp_path / "empty-cache")
    assert "sha256 mismatch" in str(e.value) and str(d / art.id) in str(e.value)
    assert "will not be loaded" in caplog.text
    # an explicit path to the tampered file is an error too, never silently replaced
    with pytest.raises(WeightsError, match="do not match the manifest"):
        resolve(art, path=f)
    # a truncated copy fails on size before hashing
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(WeightsError, match="size mismatch"):
        resolve(art, path=f)


def test_truncated_file_in_hf_cache_is_rejected(tmp_path, artifact_files):
    """A partial download left in the cache never passes as valid."""
    src, art = artifact_files
    cache = tmp_path / "hf"
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "critic.safetensors").write_bytes((src / "critic.safetensors").read_bytes()[:-17])
    write_hf_cache_repo(cache, art.repo_id, partial, revision=art.revision)
    with pytest.raises(WeightsError) as e:
        resolve(art, hf_cache_dir=cache)
    assert "size mismatch" in str(e.value)


def test_offline_error_names_everything(tmp_path, artifact_files, clean_search_dirs):
    _, art = artifact_files
    d = tmp_path / "comfy"
    register_search_dir(d, label="comfyui models")
    with pytest.raises(WeightsError) as e:
        resolve(art, hf_cache_dir=tmp_path / "cache", allow_download=True)
    msg = str(e.value)
    for needle in ("test-critic", "editsteer-test/critic", "critic.safetensors", str(d / "test-critic"),
                   str(tmp_path / "cache"), "HF_HUB_OFFLINE", "run with HF_HUB_OFFLINE unset", "put the file(s) in"):
        assert needle in msg, needle


def test_download_not_allowed_says_how(tmp_path, artifact_files, clean_search_dirs, monkeypatch):
    from huggingface_hub import constants

    _, art = artifact_files
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(WeightsError) as e:
        resolve(art, hf_cache_dir=tmp_path / "cache")
    assert "EDITSTEER_ALLOW_DOWNLOAD=1" in str(e.value) and "downloads not allowed" in str(e.value)


def test_unpublished_artifact_says_so(tmp_path, artifact_files):
    _, art = artifact_files
    art = Artifact.from_json({**art.to_json(), "status": "unpublished", "revision": None,
                              "produced_by": "editsteer train critic"})
    with pytest.raises(WeightsError) as e:
        resolve(art, hf_cache_dir=tmp_path / "cache", allow_download=True)
    assert "not published on the Hub" in str(e.value) and "editsteer train critic" in str(e.value)


def test_pickle_files_are_refused(tmp_path):
    sd = {"w": torch.zeros(3)}
    torch.save(sd, tmp_path / "model.bin")
    torch.save(sd, tmp_path / "disguised.safetensors")
    with pytest.raises(UnsafeWeightsError, match="safetensors only"):
        load_safetensors(tmp_path / "model.bin")
    with pytest.raises(UnsafeWeightsError, match="not a safetensors file"):
        load_safetensors(tmp_path / "disguised.safetensors")


def test_pickle_artifact_file_is_refused_by_resolver(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "disguised.safetensors")
    art = Artifact.from_json({"id": "ext", "description": "x", "kind": "safetensors", "base_model": "x",
                              "license": "x", "status": "external", "repo_id": "someone/x",
                              "files": [{"path": "disguised.safetensors", "sha256": None, "size": None}]})
    with pytest.raises(WeightsError, match="not a safetensors file"):
        resolve(art, path=tmp_path / "disguised.safetensors")


def test_atomic_save_leaves_no_valid_looking_file(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(Exception):
        save_safetensors({"w": "not a tensor"}, target)
    assert not target.exists()


def test_folder_artifact_from_hand_built_cache(tmp_path, tiny_kontext_dir):
    art = entry_from_folder(tiny_kontext_dir, id="tiny-kontext", description="t", kind="diffusers-pipeline",
                            base_model="flux-kontext", license="apache-2.0", status="published",
                            repo_id="editsteer-test/tiny-kontext-folder", revision="b" * 40)
    cache = tmp_path / "hf"
    write_hf_cache_repo(cache, art.repo_id, tiny_kontext_dir, revision=art.revision)
    found = resolve(art, hf_cache_dir=cache)
    assert found.source == "hf cache" and (found.path / "model_index.json").is_file()
    # one tampered file anywhere in the folder rejects the whole copy
    victim = found.path / "transformer" / "config.json"
    cfg = json.loads(victim.read_text())
    blob = victim.resolve()
    os.chmod(blob, 0o644)
    blob.write_text(json.dumps({**cfg, "num_layers": 7}))
    with pytest.raises(WeightsError, match="transformer/config.json"):
        resolve(art, hf_cache_dir=cache)


def test_write_entry_roundtrip(tmp_path, artifact_files):
    _, art = artifact_files
    write_entry(art, tmp_path)
    assert load_manifest(tmp_path)["test-critic"] == art


def test_absent_folder_artifact_is_quiet_and_explicit_path_says_missing(tmp_path, tiny_kontext_dir, caplog,
                                                                        clean_search_dirs):
    art = entry_from_folder(tiny_kontext_dir, id="tiny-kontext", description="t", kind="diffusers-pipeline",
                            base_model="flux-kontext", license="apache-2.0", status="published",
                            repo_id="editsteer-test/absent-folder", revision="c" * 40)
    with caplog.at_level("WARNING", logger="diffusers_ext.weights.resolver"):
        with pytest.raises(WeightsError, match="no valid copy found"):
            resolve(art, hf_cache_dir=tmp_path / "empty-cache", allow_download=False)
    assert not caplog.records  # nothing there is not a bad copy: no warning
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="does not hold the artifact's files"):
        resolve(art, path=tmp_path / "empty")


def test_pipeline_folders_load_safetensors_only(tmp_path):
    """A pipeline folder whose weights are a pickle is refused by the pack's folder loaders (diffusers would
    otherwise fall back to ``torch.load``)."""
    import shutil

    from safetensors.torch import load_file

    from diffusers_ext.anchoredit import AnchorEditPipeline
    from diffusers_ext.weights import resolve as resolve_id

    folder = tmp_path / "toy-anchoredit"
    shutil.copytree(resolve_id("toy-anchoredit").path, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        AnchorEditPipeline.from_toy(folder)


def test_external_pipeline_listed_by_its_configs_needs_its_weights(tmp_path, tiny_kontext_dir):
    """An external entry lists only a pipeline's configs (upstream hashes unknown); a copy with the configs alone,
    or with a shard missing, is not a copy."""
    import shutil

    configs = ["model_index.json", "transformer/config.json", "vae/config.json"]
    art = Artifact.from_json({"id": "ext-pipe", "description": "x", "kind": "diffusers-pipeline", "base_model": "x",
                              "license": "x", "status": "external", "repo_id": "someone/ext-pipe",
                              "files": [{"path": p, "sha256": None, "size": None} for p in configs]})
    folder = tmp_path / "ext-pipe"
    shutil.copytree(tiny_kontext_dir, folder)
    assert resolve(art, path=folder).source == "explicit path"
    # sharded: the index names a shard that is not there
    comp = folder / "transformer"
    (comp / "diffusion_pytorch_model.safetensors").rename(comp / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match="transformer/: 1 of 2 weight shards missing"):
        resolve(art, path=folder)
    for f in comp.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(WeightsError, match=r"transformer/: no \.safetensors weights"):
        resolve(art, path=folder)


def _clip_components():
    from diffusers_ext.weights.manifest import assets_dir

    found = []
    for cfg in sorted(assets_dir().glob("*/*/config.json")):
        if "CLIPTextModel" in (json.loads(cfg.read_text()).get("architectures") or []):
            found.append(cfg.parent)
    return found


@pytest.mark.parametrize("component", _clip_components(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_clip_text_encoders_use_the_hub_key_layout_and_load_whole(component):
    """The bundled CLIP text encoders carry the Hub's ``text_model.*`` keys (as FLUX.1 Kontext's and
    openai/clip-vit-large-patch14's files do), so every supported transformers loads them; transformers >= 5.6 saves
    them without the prefix, and 5.0-5.5 load such a file as a random encoder with a warning only. The installed
    transformers must load every weight, value for value."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    tensors = load_file(component / "model.safetensors")
    assert tensors and all(k.startswith("text_model.") for k in tensors), sorted(tensors)[:3]
    model, info = CLIPTextModel.from_pretrained(component, use_safetensors=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for key, value in tensors.items():
        name = key if key in state else key.removeprefix("text_model.")
        assert torch.equal(state[name], value), key


def test_hub_key_layout_prefixes_clip_keys_only_once(tmp_path):
    """``hub_key_layout`` gives a saved CLIPTextModel the Hub's prefix (file metadata and a shard index included),
    leaves other components alone, and a second pass changes nothing; the result loads back value for value."""
    from safetensors import safe_open
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffusers_ext.switti.tiny import tiny_text_encoders
    from diffusers_ext.weights import hub_key_layout

    _, clip, _, _ = tiny_text_encoders()
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2))
    clip.save_pretrained(tmp_path / "text_encoder")
    t5.save_pretrained(tmp_path / "text_encoder_2")
    t5_before = (tmp_path / "text_encoder_2" / "model.safetensors").read_bytes()
    # a pre-5.6-style shard index next to the weights, as a sharded save writes it
    index = tmp_path / "text_encoder" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"embeddings.token_embedding.weight": "x",
                                                                "text_model.final_layer_norm.weight": "x"}}))
    hub_key_layout(tmp_path)
    with safe_open(tmp_path / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys()) and f.metadata().get("format") == "pt"
    assert set(json.loads(index.read_text())["weight_map"]) == {"text_model.embeddings.token_embedding.weight",
                                                                "text_model.final_layer_norm.weight"}
    assert (tmp_path / "text_encoder_2" / "model.safetensors").read_bytes() == t5_before
    assert hub_key_layout(tmp_path) == []
    index.unlink()
    back = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", use_safetensors=True)
    for (name, a), b in zip(clip.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name

"""Test session setup: no network, a private Hugging Face cache, small thread count.

HF_HUB_OFFLINE and HF_HUB_CACHE are read when huggingface_hub is first imported, so they are set here, before any
test module imports diffusers or transformers.
"""

import os
import tempfile

# Idempotent: test modules that `import conftest` re-execute this file as a second module; it must not move the
# session's folders (huggingface_hub reads HF_HUB_CACHE once, at its first import).
_SESSION_TMP = os.environ.get("EDITSTEER_TEST_TMP") or tempfile.mkdtemp(prefix="editsteer-tests-")
os.environ["EDITSTEER_TEST_TMP"] = _SESSION_TMP
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(_SESSION_TMP, "hf-hub")
os.environ["HF_HOME"] = os.path.join(_SESSION_TMP, "hf-home")
os.environ["HF_MODULES_CACHE"] = os.path.join(_SESSION_TMP, "hf-modules")
os.environ["DIFFUSERS_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
for _var in ("EDITSTEER_ALLOW_DOWNLOAD", "EDITSTEER_WEIGHTS_DIR", "EDITSTEER_MANIFEST_DIR"):
    os.environ.pop(_var, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return Path(_SESSION_TMP)


@pytest.fixture(scope="session")
def hf_cache(session_tmp) -> Path:
    """The session's (empty at start) Hugging Face hub cache, the one huggingface_hub uses by default here."""
    p = Path(os.environ["HF_HUB_CACHE"])
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session")
def tiny_kontext_dir(session_tmp) -> Path:
    """A tiny FluxKontextPipeline saved with save_pretrained (Hub layout), with locally built tokenizers."""
    from diffusers_ext.tiny import TinyKontextConfig, tiny_kontext_pipeline
    from diffusers_ext.toy.world import vocabulary
    from diffusers_ext.weights import hub_key_layout

    out = session_tmp / "tiny-kontext"
    if not out.exists():
        tiny_kontext_pipeline(TinyKontextConfig(words=tuple(vocabulary()))).save_pretrained(out)
        hub_key_layout(out)  # the CLIP text encoder's keys as FLUX.1 Kontext's Hub checkpoint has them
    return out


@pytest.fixture(scope="session")
def tiny_qwen_dir(session_tmp) -> Path:
    """A tiny QwenImageEditPipeline (no text encoder: prompt embeddings are passed) saved in Hub layout."""
    from diffusers_ext.tiny import tiny_qwen_edit_pipeline

    out = session_tmp / "tiny-qwen-edit"
    if not out.exists():
        tiny_qwen_edit_pipeline().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_wan_dir(session_tmp) -> Path:
    from diffusers_ext.tiny import tiny_wan_transformer

    out = session_tmp / "tiny-wan-transformer"
    if not out.exists():
        tiny_wan_transformer().save_pretrained(out)
    return out

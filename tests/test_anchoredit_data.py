"""AnchorEdit training data: the instruction memo stays bounded and exact; mixed image sizes are a clear error."""

import json

import numpy as np
import pytest
import torch

from fixtures_anchoredit import small_pipeline

from diffusers_ext.anchoredit.data import JsonSequenceData, _Encoders
from diffusers_ext.errors import EditSteerConfigError

TEXTS = ["add a red circle", "remove the blue square", "make the green triangle yellow", "red", "blue circle",
         "remove the red square", ""]


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline()


def test_instruction_memo_is_a_bounded_lru_and_returns_what_the_encoder_gives(pipe):
    """Real data brings new instructions every step; an unbounded memo of padded embeddings on the accelerator
    (8 MiB each at Wan size) grows without end. The memo keeps unpadded copies on the CPU, evicts the least recently
    used beyond its byte bound, and still returns exactly the encoder's tensors."""
    ref = pipe.encode_instructions(TEXTS)
    full = _Encoders(pipe)
    assert torch.equal(full.text(TEXTS), ref)
    assert full.text_cache_size[0] == len(TEXTS)
    stored = list(full._text.values())
    assert all(e.device.type == "cpu" and e.shape[0] < ref.shape[1] for e in stored)  # padding not stored
    assert full.text_cache_size[1] < ref.numel() * ref.element_size() / 2

    bound = int(2.5 * max(e.numel() * e.element_size() for e in stored))
    small = _Encoders(pipe, text_cache_bytes=bound)
    for i, s in enumerate(TEXTS):
        assert torch.equal(small.text([s, TEXTS[0]]), torch.stack([ref[i], ref[0]]))  # TEXTS[0]: recently used
        assert small.text_cache_size[1] <= bound
    assert small.text_cache_size[0] < len(TEXTS)
    assert TEXTS[0] in small._text and TEXTS[1] not in small._text  # least recently used went first
    again = small.text(TEXTS[::-1])  # evicted ones are encoded again, identically
    assert torch.equal(again, ref.flip(0)) and again.device == ref.device and again.dtype == ref.dtype


def _png(path, h, w, value):
    from PIL import Image

    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_json_batch_of_mixed_image_sizes_is_a_clear_error(pipe, tmp_path):
    samples = []
    for j, (h, w) in enumerate([(32, 32), (40, 32)]):
        names = [f"s{j}_{i}.png" for i in range(2)]
        for i, n in enumerate(names):
            _png(tmp_path / n, h, w, 40 * i + 10 * j)
        samples.append({"images": names, "instructions": [f"edit {j}"]})
    (tmp_path / "data.json").write_text(json.dumps(samples))
    data = JsonSequenceData(pipe, tmp_path / "data.json", max_turns=1)
    with pytest.raises(EditSteerConfigError, match=r"mixes image sizes.*--batch-size 1"):
        data.sequences(torch.Generator().manual_seed(0), 8, 1)
    for seed in range(4):  # one sample per batch always works, whatever its size
        lat, emb = data.sequences(torch.Generator().manual_seed(seed), 1, 1)
        assert lat.shape[:3] == (1, 4, 2) and emb.shape[:2] == (1, 2)

"""Captions of the MLN toy: partial training captions and the bench's focus captions (the edit's subject only)."""

import numpy as np
import pytest

from diffusers_ext.mln.captions import CAPTION_MODES, caption, case_captions, focus_captions, partial_caption
from diffusers_ext.toy import world as W


def _subset_captions(scene: W.Scene) -> set[str]:
    """Every caption of ``scene`` that names a subset of its objects in the world's order."""
    n = len(scene.objects)
    return {caption(scene.background, [o for j, o in enumerate(scene.objects) if mask >> j & 1])
            for mask in range(2 ** n)}


def test_partial_captions_name_subsets_in_world_order_and_sometimes_everything():
    rng = np.random.default_rng(0)
    scenes = [W.random_scene(rng, 2, W.MAX_OBJECTS) for _ in range(200)]
    caps = [partial_caption(s, rng, p_full=0.5) for s in scenes]
    assert all(c in _subset_captions(s) for s, c in zip(scenes, caps))
    full = sum(c == s.caption() for s, c in zip(scenes, caps)) / len(scenes)
    assert 0.5 < full < 0.8  # p_full, plus the subsets that happen to keep every object
    assert any(c == f"a {s.background} background" for s, c in zip(scenes, caps))
    assert all(partial_caption(s, rng, p_full=1.0) == s.caption() for s in scenes[:20])


def test_focus_captions_name_only_the_edited_object_and_the_background():
    seen = set()
    for i in range(60):
        case = W.make_case("heldout", seed=0, index=i)
        e = case.edit
        src, tgt = focus_captions(e)
        seen.add(e.family)
        assert src != tgt, (e.family, src)
        # what a partial training caption of the same scene could say: the train and bench captions share a support
        assert src in _subset_captions(e.before) and tgt in _subset_captions(e.after)
        assert src.endswith(f"on a {e.before.background} background") or src == f"a {e.before.background} background"
        named = [c.count(" at the ") for c in (src, tgt)]
        expected = {"background": [0, 0], "add": [0, 1], "remove": [1, 0]}.get(e.family, [1, 1])
        assert named == expected, (e.family, src, tgt)
    assert seen == set(W.FAMILIES)


def test_case_captions_modes():
    case = W.make_case("heldout", seed=0, index=3)
    assert case_captions(case, "full") == (case.source_caption, case.target_caption)
    assert case_captions(case, "focus") == focus_captions(case.edit)
    assert set(CAPTION_MODES) == {"focus", "full"}
    with pytest.raises(ValueError, match="caption mode"):
        case_captions(case, "short")


def test_bench_methods_caption_by_mode_and_record_it(tmp_path):
    import argparse

    from diffusers_ext.bench import harness
    from diffusers_ext.mln.bench import MLNMethod, RegenMethod

    def method(cls, *argv):
        p = argparse.ArgumentParser()
        cls.add_arguments(p)
        return cls(p.parse_args(list(argv)))

    runs = {}
    for cls in (MLNMethod, RegenMethod):
        with pytest.raises(SystemExit):
            method(cls, "--captions", "short")
        for mode in CAPTION_MODES:
            m = method(cls, "--captions", mode)
            res = harness.run(m, cases=2, seed=0, split="train", out=tmp_path / f"{cls.name}-{mode}", progress=False)
            assert res["settings"]["captions"] == mode
            runs[cls.name, mode] = [c["edit_region_mse"] for c in res["per_case"]]
    # regeneration draws what its caption says: the same seed, other captions, other images
    assert runs["regen", "focus"] != runs["regen", "full"]

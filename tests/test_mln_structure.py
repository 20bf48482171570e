"""MLN's call structure on the official 512 schedule (``methods.md`` 4.4), on a tiny Switti of the real classes.

What is pinned down: at which scales the transformer runs, with how many prompt rows and on which prefix; where the
mask comes from (scale, prefix, row order of the attention difference); which scales copy the source; where guidance
and hard sampling apply; the row-pass count (``nfe``); and the token-row counts of the speed variant.

The model is untrained and tiny (width 32, depth 2, 64 codes) but has the real 10-scale schedule
(1, 2, 3, 4, 6, 9, 13, 18, 24, 32); its VQ-VAE downsamples by 2, so it edits 64-px images on a 32 x 32 grid.
The calls are observed by wrapping the real methods (the wrappers record, then call the original).
"""

from __future__ import annotations

import pytest
import torch
from fixtures_mln import random_image

from diffusers_ext.mln import MLNConfig, MLNPipeline, core
from diffusers_ext.mln.masks import attention_difference, changed_token_pairs
from diffusers_ext.mln.pipeline import image_to_tensor
from diffusers_ext.mln.sampler import ClassifierFreeGuidance, MaskedLogitSampler, SourceNudge, Temperature
from diffusers_ext.mln.speed import token_rows_mln, token_rows_plain
from diffusers_ext.switti.backbone import SwittiBackbone
from diffusers_ext.switti.transformer import SwittiTransformer

PNS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
K = len(PNS_512)
VOCAB = 64
# Prompts differing by one replaced word (tests 1, 2) and by one inserted word (test 3); all in the toy vocabulary.
PS = "a large red circle at the center on a black background"
PT = "a large blue circle at the center on a black background"
PS_SHORT = "a red circle at the center on a black background"  # PS_SHORT -> PS inserts "large"


@pytest.fixture(scope="module")
def pipe():
    from diffusers_ext.switti.tiny import TinySwittiConfig, tiny_switti_pipeline
    from diffusers_ext.toy import world

    cfg = TinySwittiConfig(patch_nums=PNS_512, vocab_size=VOCAB, z_channels=8, vae_ch=16, vae_ch_mult=(1, 1),
                           vae_norm_groups=8, depth=2, embed_dim=32, num_heads=2, words=tuple(world.vocabulary()))
    p = tiny_switti_pipeline(cfg, seed=0, pipeline_cls=MLNPipeline)
    p.set_progress_bar_config(disable=True)
    assert p.patch_nums == PNS_512 and p.resolution == 64
    return p


@pytest.fixture(scope="module")
def image():
    return random_image(size=64, seed=3)


@pytest.fixture(scope="module")
def source(pipe, image):
    """The source's tokens and accumulated features per scale, straight from the VQ-VAE (``img_to_idxBl`` /
    ``img_to_fhat``, the spec's references), not through the backbone under test."""
    x = image_to_tensor(image)  # the pipeline's own conversion; 64 px = the model's size, so no resizing
    with torch.no_grad():
        return pipe.vqvae.img_to_idxBl(x, PNS_512), pipe.vqvae.img_to_fhat(x, PNS_512)


def preset_512(**kw) -> MLNConfig:
    """The official preset; only top_k shrinks to the tiny vocabulary (400 > 64 would mean 'no top-k' anyway)."""
    return MLNConfig.preset("512", top_k=VOCAB, **kw)


class Trace:
    """Records every transformer pass (which backbone method asked for it, scale, rows, input prefix), the
    per-scale code maps the sampler embeds (hard / soft, and the hard indices) and where CFG changed the logits."""

    def __init__(self, monkeypatch):
        self.passes: list[dict] = []  # one per SwittiTransformer.forward_scale call
        self.embeds: dict[int, tuple[str, torch.Tensor | None]] = {}  # sampler loop only
        self.cfg_applied: list[int] = []
        self.f_hat_after: dict[int, torch.Tensor] = {}  # from the pipeline's callback
        self._caller: str | None = None
        self._prefix: torch.Tensor | None = None
        self._in_loop = False

        def wrap(cls, name, wrapper_factory):
            monkeypatch.setattr(cls, name, wrapper_factory(getattr(cls, name)))

        def caller(tag):
            def factory(orig):
                def w(bb, *a, **kw):
                    self._caller = tag
                    try:
                        return orig(bb, *a, **kw)
                    finally:
                        self._caller = None
                return w
            return factory

        wrap(SwittiBackbone, "cross_attention_maps", caller("mask"))
        wrap(SwittiBackbone, "scale_logits", caller("logits"))

        def scale_input(orig):
            def w(tr, k, cond, f_hat=None, *a, **kw):
                self._prefix = None if f_hat is None else f_hat.detach().clone()
                return orig(tr, k, cond, f_hat, *a, **kw)
            return w

        def forward_scale(orig):
            def w(tr, x, k, *a, **kw):
                self.passes.append(dict(by=self._caller, k=k, rows=x.shape[0], prefix=self._prefix))
                return orig(tr, x, k, *a, **kw)
            return w

        wrap(SwittiTransformer, "scale_input", scale_input)
        wrap(SwittiTransformer, "forward_scale", forward_scale)

        def run(orig):
            def w(sampler, *a, **kw):
                self._in_loop = True
                try:
                    return orig(sampler, *a, **kw)
                finally:
                    self._in_loop = False
            return w

        wrap(MaskedLogitSampler, "run", run)

        def embed(kind):
            def factory(orig):
                def w(bb, k, t):
                    if self._in_loop:
                        self.embeds[k] = (kind, t.detach().clone() if kind == "hard" else None)
                    return orig(bb, k, t)
                return w
            return factory

        wrap(SwittiBackbone, "embed_tokens", embed("hard"))
        wrap(SwittiBackbone, "embed_probs", embed("soft"))

        def cfg_call(orig):
            def w(proc, k, logits, state):
                out = orig(proc, k, logits, state)
                if not torch.equal(out, logits):
                    self.cfg_applied.append(k)
                return out
            return w

        wrap(ClassifierFreeGuidance, "__call__", cfg_call)

    def callback(self, pipe, k, _t, kw):
        self.f_hat_after[k] = kw["f_hat"].detach().clone()
        return kw

    def by(self, tag):
        return [p for p in self.passes if p["by"] == tag]


def edit(pipe, image, cfg, monkeypatch, source_prompt=PS, target_prompt=PT):
    trace = Trace(monkeypatch)
    out = pipe(image, source_prompt, target_prompt, config=cfg, seed=42, output_type="pt",
               callback_on_step_end=trace.callback)
    return trace, out


def assert_prefix_is_source_through(prefix, src_fhat, last):
    """``prefix`` is the source's accumulated features through scale ``last`` (``img_to_fhat(x)[last]``) and
    distinguishably not those through ``last - 1`` or ``last + 1``."""
    torch.testing.assert_close(prefix, src_fhat[last], atol=1e-5, rtol=1e-5)
    for other in (last - 1, last + 1):
        assert (src_fhat[other] - src_fhat[last]).abs().max() > 1e-3  # the check above can tell scales apart


# ------------------------------------------------------------------------------------------------------------------


def test_preset_512_runs_the_official_structure(pipe, image, source, monkeypatch):
    """Preset "512" (methods.md 4.4): one mask call at the last scale K-1 = 9 on the source prefix through scale 8,
    before any edited scale; scales 0..4 copied (no transformer, exact source tokens); scales 5..9 each run with both
    rows [target; source] (scale 9 too: the TV weight needs the source row); nfe = 2 + 5 x 2 = 12. Guidance on 5..8,
    off at 9, which samples hard tokens (soft Gumbel on 5..8)."""
    src_idx, src_fhat = source
    cfg = preset_512()
    trace, out = edit(pipe, image, cfg, monkeypatch)

    # every transformer pass came from one of the two entry points
    assert all(p["by"] in ("mask", "logits") for p in trace.passes), trace.passes
    # the mask: once, first, at k = 9, two rows, on the source prefix through scale 8
    mask = trace.by("mask")
    assert [(p["k"], p["rows"]) for p in mask] == [(9, 2)]
    assert trace.passes[0] is mask[0]  # before any edited scale
    assert_prefix_is_source_through(mask[0]["prefix"], src_fhat, K - 2)
    assert out.info["mask_scale"] == 9 and out.info["mask_source"] == "auto"
    # copy scales: no transformer pass below s = 5; edited scales 5..9 in order, each with both rows
    assert all(p["k"] >= 5 for p in trace.passes)
    assert [(p["k"], p["rows"]) for p in trace.by("logits")] == [(5, 2), (6, 2), (7, 2), (8, 2), (9, 2)]
    # the first edited scale sees exactly the source's prefix through scale 4
    assert_prefix_is_source_through(trace.by("logits")[0]["prefix"], src_fhat, 4)
    # nfe: 2 mask rows + 5 scales x 2 rows, and it matches the passes actually made
    assert out.info["nfe"] == 12 == sum(p["rows"] for p in trace.passes)

    # scales 0..4 embed the source tokens verbatim, and the accumulated features after them are the source's
    for k in range(5):
        kind, idx = trace.embeds[k]
        assert kind == "hard" and torch.equal(idx, src_idx[k]), k
        torch.testing.assert_close(trace.f_hat_after[k], src_fhat[k], atol=1e-5, rtol=1e-5)
    # sampling: soft Gumbel while guided (5..8), hard top-k / top-p at the last scale
    assert [trace.embeds[k][0] for k in range(5, K)] == ["soft"] * 4 + ["hard"]
    assert sorted(trace.f_hat_after) == list(range(K))

    # guidance: CFG changed the logits on 5..8 and left scale 9 alone ...
    assert trace.cfg_applied == [5, 6, 7, 8]
    # ... as the processors say: CFG needs the source row on 5..8 only; the TV-weighted nudge still needs it at 9
    # (that is why scale 9 keeps two rows); the 0.1 temperature applies at 9 only
    procs = core.build_sampler(cfg).processors
    cfg_p = next(p for p in procs if isinstance(p, ClassifierFreeGuidance))
    nudge = next(p for p in procs if isinstance(p, SourceNudge))
    temp = next(p for p in procs if isinstance(p, Temperature))
    assert [cfg_p.needs_negative(k) for k in range(5, K)] == [True] * 4 + [False]
    assert nudge.needs_negative(9) and nudge.weighted(9)
    z = torch.ones(1, 1, 4)
    assert torch.equal(temp(9, z, None), z / 0.1) and torch.equal(temp(8, z, None), z)


def test_fast_variant_moves_the_mask_and_drops_the_last_source_row(pipe, image, source, monkeypatch):
    """``MLNConfig.preset("512").fast()`` (EditSteer's speed variant, not the official method): mask at K-2 = 8 on the
    source prefix through scale 7, two rows on 5..8 and only the target row at 9 (no TV weight there); nfe 11. The
    token-row counts of speed.py follow by construction from the 512 schedule (squares 1 .. 1024):
    plain (CFG pair on 0..8, one row at 9) 2 x 1216 + 1024 = 3456; preset: mask 2 x 1024 + 2 x (81 + ... + 1024) =
    2048 + 4348 = 6396; fast: mask 2 x 576 + 2 x (81 + 169 + 324 + 576) + 1024 = 1152 + 2300 + 1024 = 4476."""
    _, src_fhat = source
    cfg = MLNConfig.preset("512").fast().replace(top_k=VOCAB)
    assert (cfg.mask_scale, cfg.tv_stop) == (8, 9)
    trace, out = edit(pipe, image, cfg, monkeypatch)

    mask = trace.by("mask")
    assert [(p["k"], p["rows"]) for p in mask] == [(8, 2)] and trace.passes[0] is mask[0]
    assert_prefix_is_source_through(mask[0]["prefix"], src_fhat, K - 3)
    assert out.info["mask_scale"] == 8
    assert [(p["k"], p["rows"]) for p in trace.by("logits")] == [(5, 2), (6, 2), (7, 2), (8, 2), (9, 1)]
    assert out.info["nfe"] == 11 == sum(p["rows"] for p in trace.passes)
    assert trace.cfg_applied == [5, 6, 7, 8]
    # the mask, computed on the 24 x 24 grid, is returned on the final 32 x 32 grid (here at the image size)
    assert out.masks.shape == (1, 64, 64)

    assert token_rows_plain(PNS_512, 9) == 3456
    assert token_rows_mln(PNS_512, MLNConfig.preset("512")) == 6396
    assert token_rows_mln(PNS_512, MLNConfig.preset("512").fast()) == 4476


# ------------------------------------------------------------------------------------------------------------------


def reference_difference(A_src, A_tgt, pairs):
    """The spec's d (methods.md 4.4 step 3) written out with loops: for each compared token pair,
    D = |A_src[:, i] - A_tgt[:, j]| with a missing partner read as an all-zero map; D /= max D; d = mean D;
    d /= max d."""
    N = len(A_src)
    D = []
    for i, j in pairs:
        D.append([abs((float(A_src[n][i]) if i is not None else 0.0) - (float(A_tgt[n][j]) if j is not None else 0.0))
                  for n in range(N)])
    top = max(max(row) for row in D)
    d = [sum(row[n] / top for row in D) / len(D) for n in range(N)]
    return torch.tensor([v / max(d) for v in d])


def test_attention_difference_rows_are_source_minus_target(pipe, image):
    """With an inserted word the source map and the target map are read at different positions, so the row order
    matters: ``attention_difference(maps_src, maps_tgt, pairs)`` must compare the source run's map at the source
    position with the target run's map at the target position, the inserted word against zero (README 'The mask':
    replaced tokens pairwise, inserted / deleted ones against zero). Checked on hand-made maps, then on the real
    tiny model: compute_edit_mask's batched [target; source] maps must enter as (source, target)."""
    # ids: 0 start, 1 end/pad. source "a red circle here", target "a red big circle here" ("big" = 20 inserted)
    src_ids = [0, 10, 11, 12, 13, 1, 1, 1]
    tgt_ids = [0, 10, 11, 20, 12, 13, 1, 1]
    pairs = changed_token_pairs(src_ids, tgt_ids, 6, 7, neighbours=1)
    # the insertion against zero, plus its aligned neighbours "red" (2 <-> 2) and "circle" (3 <-> 4)
    assert sorted(pairs, key=str) == sorted([(None, 3), (2, 2), (3, 4)], key=str)

    N, T = 4, 8  # 4 image tokens, 8 text positions; maps[n, t]
    A_tgt = torch.zeros(N, T)
    A_src = torch.zeros(N, T)
    A_tgt[:, 2] = A_src[:, 2] = 0.1  # "red": same in both runs -> no difference
    A_tgt[:, 3] = torch.tensor([0.9, 0, 0, 0])  # target's inserted "big" attends to image token 0
    A_tgt[:, 4] = torch.tensor([0, 0.5, 0, 0])  # target's "circle" (position 4)
    A_src[:, 3] = torch.tensor([0, 0, 0.5, 0])  # source's "circle" (position 3)
    A_src[:, 4] = torch.tensor([0, 0, 0, 0.8])  # source's "here" (position 4; not compared)

    d = attention_difference(A_src, A_tgt, pairs)
    expected = reference_difference(A_src.tolist(), A_tgt.tolist(), pairs)
    torch.testing.assert_close(d, expected)
    # by hand: D = [0.9,0,0,0] ("big" vs 0), 0 ("red"), [0,.5,.5,0] ("circle" 3 vs 4) -> d = [1, 5/9, 5/9, 0]
    torch.testing.assert_close(d, torch.tensor([1.0, 5 / 9, 5 / 9, 0.0]))
    # a swapped row order reads "circle" as the inserted word and "here" as "circle": a different map
    swapped = attention_difference(A_tgt, A_src, pairs)
    assert (swapped - expected).abs().max() > 0.5 and swapped[3] > 0
    # a deletion (the same prompts the other way round): the deleted source token against zero
    back = changed_token_pairs(tgt_ids, src_ids, 7, 6, neighbours=0)
    assert back == [(3, None)]
    torch.testing.assert_close(attention_difference(A_tgt, A_src, back), A_tgt[:, 3] / A_tgt[:, 3].max())

    # the real wiring, end to end: MLNPipeline stacks the rows [target; source], compute_edit_mask must hand them to
    # attention_difference as (source, target). Tiny 512-schedule model, "large" inserted into the target prompt.
    cfg = preset_512()
    out = pipe(image, PS_SHORT, PS, config=cfg, seed=42, output_type="pt")
    assert out.info["mask_scale"] == K - 1
    enc_s, enc_t = pipe.encode_prompt([PS_SHORT]), pipe.encode_prompt([PS])
    real_pairs = changed_token_pairs(enc_s.input_ids[0].tolist(), enc_t.input_ids[0].tolist(),
                                     int(enc_s.attention_mask[0].sum()), int(enc_t.attention_mask[0].sum()),
                                     cfg.mask_neighbours)
    assert any(i is None for i, _ in real_pairs)  # an insertion, so source and target positions differ
    with torch.no_grad():
        # each prompt's maps from its own single-row pass (as the spec runs them) on the source prefix through K-2
        prefix = pipe.vqvae.img_to_fhat(image_to_tensor(image), PNS_512)[K - 2]
        blocks = cfg.blocks_for_depth(len(pipe.transformer.blocks))
        single = {}
        for name, enc in (("src", enc_s), ("tgt", enc_t)):
            bb = SwittiBackbone(pipe.transformer, pipe.vqvae, pipe.prepare_conditioning([enc]), batch=1)
            single[name] = bb.cross_attention_maps(K - 1, prefix, groups=1, blocks=blocks)[0]
    got = out.info["attention_difference"].flatten()
    want = reference_difference(single["src"].tolist(), single["tgt"].tolist(), real_pairs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    wrong = reference_difference(single["tgt"].tolist(), single["src"].tolist(), real_pairs)
    assert (wrong - want).abs().max() > 1e-2  # the comparison above would catch swapped rows

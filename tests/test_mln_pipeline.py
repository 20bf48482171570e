"""The MLN pipeline on a tiny untrained Switti: parity with plain sampling, anchoring, masks, bad inputs, the
custom_pipeline shim."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_mln import PS, PT, random_image, same_state, state_snapshot, tiny_mln_config, tiny_mln_pipeline

from diffusers_ext.errors import EditSteerConfigError
from diffusers_ext.switti import SwittiPipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_mln_pipeline()


def test_neutral_settings_reproduce_plain_switti_sampling(pipe):
    """beta = alpha = 0, s = 0, no refinement: plain Switti sampling of the target prompt with the source prompt as
    the negative (soft Gumbel, CFG 8, last-scale temperature 0.1, same per-scale reseeding), bit for bit."""
    cfg = tiny_mln_config().neutral()
    img = random_image()
    out = pipe(img, PS, PT, config=cfg, seed=5, output_type="pt")
    plain = SwittiPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    ref = plain(PT, negative_prompt=PS, guidance_scale=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p,
                smooth_start_si=cfg.smooth_start, turn_off_cfg_start_si=cfg.cfg_stop, last_scale_temp=cfg.last_temp,
                seed=5, reseed_every_scale=True, output_type="pt").images
    assert torch.equal(out.images, ref)
    # and the same number of transformer row-passes: 2 per guided scale, 1 on the last
    assert out.info["nfe"] == 2 * (cfg.num_scales - 1) + 1
    # a different seed gives a different image (the comparison above is not vacuous)
    other = plain(PT, negative_prompt=PS, guidance_scale=cfg.cfg, top_k=cfg.top_k, seed=6, reseed_every_scale=True,
                  turn_off_cfg_start_si=cfg.cfg_stop, output_type="pt").images
    assert not torch.equal(other, ref)


def test_strong_nudging_reproduces_the_source_tokens(pipe):
    """With a huge, unweighted nudge everywhere the sampler picks the source token at every scale, so the edit
    decodes to the VQ-VAE reconstruction of the source."""
    cfg = tiny_mln_config(beta=1e4, alphas=(1e4,) * 4, tv_adaptive=False, refine_steps=0)
    img = random_image(seed=1)
    out = pipe(img, PS, PT, config=cfg, seed=0, output_type="pt").images
    from diffusers_ext.mln.pipeline import image_to_tensor

    with torch.no_grad():
        rec = pipe.vqvae.idxBl_to_img(pipe.vqvae.img_to_idxBl(image_to_tensor(img), pipe.patch_nums))
    torch.testing.assert_close(out, rec.add(1).div(2).clamp(0, 1), atol=2e-3, rtol=0)


def test_auto_user_and_global_masks(pipe):
    img = random_image(seed=2)
    cfg = tiny_mln_config()
    auto = pipe(img, PS, PT, config=cfg, output_type="np")
    assert auto.info["mask_source"] == "auto" and auto.masks.shape == (1, 16, 16)
    G = pipe.patch_nums[-1]
    assert 0 < auto.masks.mean() < 1 and auto.masks.mean() == pytest.approx(round((1 - 0.8) * G * G) / (G * G),
                                                                            abs=1 / G**2)
    user = np.zeros((16, 16), np.float32)
    user[:8] = 1
    got = pipe(img, PS, PT, mask=user, config=cfg, output_type="np")
    assert got.info["mask_source"] == "user" and np.array_equal(got.masks[0], user)
    both = pipe(img, PS, PT, mask=user, mask_mode="intersect", config=cfg, output_type="np")
    assert np.array_equal(both.masks[0], auto.masks[0] * user)  # the automatic mask, cut to the user's region
    assert 0 < both.masks[0].sum() < auto.masks[0].sum()  # (not vacuous: the cut keeps some and drops some)
    glob = pipe(img, PS, "a watercolour painting", global_edit=True, config=cfg, output_type="np")
    assert glob.info["mask_source"] == "global" and glob.masks.min() == 1
    same = pipe(img, PS, PS, config=cfg, output_type="np")  # nothing to edit: an empty mask, said so
    assert same.masks.max() == 0 and "identical" in same.info["mask_source"]


def test_image_size_mismatch_is_resized_with_a_warning_or_refused(pipe):
    img = random_image(size=24)
    out = pipe(img, PS, PT, config=tiny_mln_config(), output_type="np")
    assert out.images.shape == (1, 24, 24, 3) and out.masks.shape == (1, 24, 24)
    assert any("resized from 24x24 to 16x16" in w for w in out.info["warnings"])
    with pytest.raises(EditSteerConfigError, match="24x24.*16x16"):
        pipe(img, PS, PT, config=tiny_mln_config(), resize="error")


def test_float_images_in_either_range_and_bad_ranges(caplog):
    """[0, 1] floats are the documented input; a tensor in [-1, 1] (diffusers' internal range) is recognised by its
    negative values and used as it is, with a warning; 0-255 floats are refused instead of clipping to white."""
    from diffusers_ext.mln.pipeline import image_to_tensor

    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        assert torch.equal(image_to_tensor(x), x.mul(2).sub(1)[None]) and not caplog.records
        assert torch.equal(image_to_tensor(x.mul(2).sub(1)), x.mul(2).sub(1)[None])
    assert any("already in [-1, 1]" in r.getMessage() for r in caplog.records)
    with pytest.raises(EditSteerConfigError, match=r"values reach 2\d\d; pass floats in \[0, 1\]"):
        image_to_tensor(x.permute(1, 2, 0).numpy() * 255)
    assert torch.equal(image_to_tensor((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)),
                       image_to_tensor(x.mul(255).round().div(255)))
    # a uint8 tensor (torchvision.io.read_image) is 0..255, as a uint8 array is
    assert torch.equal(image_to_tensor(x.mul(255).round().to(torch.uint8)), image_to_tensor(x.mul(255).round().div(255)))


def test_diffusers_style_generator_and_unknown_arguments(pipe):
    """``generator=`` works as in diffusers (it stands for its seed, since the sampler reseeds at every scale);
    an argument that is neither the pipeline's nor an MLNConfig field is refused by name, with where it went."""
    img, cfg = random_image(seed=3), tiny_mln_config()
    by_seed = pipe(img, PS, PT, config=cfg, seed=7, output_type="np").images
    by_gen = pipe(img, PS, PT, config=cfg, generator=torch.Generator().manual_seed(7), output_type="np").images
    other = pipe(img, PS, PT, config=cfg, generator=[torch.Generator().manual_seed(8)], output_type="np").images
    assert np.array_equal(by_seed, by_gen) and not np.array_equal(by_seed, other)
    with pytest.raises(EditSteerConfigError, match="seed or generator, not both"):
        pipe(img, PS, PT, config=cfg, seed=7, generator=torch.Generator().manual_seed(7))
    with pytest.raises(EditSteerConfigError, match=r"'guidance_scale'.* beta, .*'guidance_scale': .*'cfg'"):
        pipe(img, PS, PT, config=cfg, guidance_scale=4.0)
    assert pipe(img, PS, PT, config=cfg, cfg=4.0, output_type="np").info["preset"] == "tiny+cfg"


def test_a_mask_that_cannot_act_is_returned_as_given_with_a_warning(pipe):
    """With equal nudges inside and outside and no refinement the mask changes nothing (so none is computed); a
    user's mask is still returned as the mask used, and the result says it had no effect. A global edit says it
    ignored the mask. A (H, W, 1) mask is one channel."""
    img = random_image(seed=4)
    user = np.zeros((16, 16, 1), np.float32)
    user[4:12, 4:12] = 1
    flat = tiny_mln_config(alphas=(5.0,) * 4, beta=5.0, refine_steps=0)
    out = pipe(img, PS, PT, mask=user, config=flat, output_type="np")
    assert np.array_equal(out.masks[0], user[..., 0]) and out.info["mask_source"].startswith("user, no effect")
    assert any("no effect" in w for w in out.info["warnings"])
    plain = pipe(img, PS, PT, config=flat, output_type="np")
    assert np.array_equal(plain.images, out.images) and plain.masks.max() == 0 and not plain.info["warnings"]
    glob = pipe(img, PS, PT, mask=user, global_edit=True, config=tiny_mln_config(), output_type="np")
    assert glob.masks.min() == 1 and any("mask input is ignored" in w for w in glob.info["warnings"])


def test_automatic_mask_without_prompt_tokens_is_refused(pipe):
    """``mln_edit`` called directly (no pipeline) needs the prompts' token ids for the automatic mask; without them
    it says what to pass instead of failing inside the token alignment."""
    from diffusers_ext.mln.core import mln_edit
    from diffusers_ext.mln.pipeline import image_to_tensor
    from diffusers_ext.switti.backbone import SwittiBackbone

    enc = [pipe.encode_prompt([p], pipe.device) for p in (PT, PS)]
    backbone = SwittiBackbone(pipe.transformer, pipe.vqvae, pipe.prepare_conditioning(enc), batch=1)
    img = image_to_tensor(random_image())
    with pytest.raises(EditSteerConfigError, match="source_ids and target_ids"):
        mln_edit(backbone, img, tiny_mln_config())
    out = mln_edit(backbone, img, tiny_mln_config(global_edit=True))  # no automatic mask: no ids needed
    assert out.info["mask_source"] == "global"


def test_bad_inputs_fail_clearly_and_leave_the_model_as_it_was(pipe):
    snap_t, snap_v = state_snapshot(pipe.transformer), state_snapshot(pipe.vqvae)
    procs = pipe.transformer.cross_attn_processors
    img = random_image()
    with pytest.raises(EditSteerConfigError, match="mask has shape"):
        pipe(img, PS, PT, mask=np.ones((10, 10)), config=tiny_mln_config())
    with pytest.raises(EditSteerConfigError, match="4-scale Switti|needs 10 scales|has 4 scales"):
        pipe(img, PS, PT, preset="512")
    with pytest.raises(EditSteerConfigError, match="strings"):
        pipe(img, [PS], PT, config=tiny_mln_config())
    with pytest.raises(EditSteerConfigError, match="image must be"):
        pipe("not an image", PS, PT, config=tiny_mln_config())

    class Stop(Exception):
        pass

    def interrupt(p, k, t, kw):  # e.g. a ComfyUI interrupt in the middle of the scale loop
        if k == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe(img, PS, PT, config=tiny_mln_config(), callback_on_step_end=interrupt)
    # an error inside the mask pass (bad features) still restores the attention processors
    from diffusers_ext.switti import SwittiBackbone

    enc = pipe.encode_prompt([PT])
    bb = SwittiBackbone(pipe.transformer, pipe.vqvae, pipe.prepare_conditioning([enc, enc]), batch=1)
    with pytest.raises(RuntimeError):
        bb.cross_attention_maps(3, torch.zeros(1, 5, 4, 4), groups=2, blocks=range(0, 2))
    assert pipe.transformer.cross_attn_processors == procs
    from diffusers_ext.mln import MLNBackbone, VARBackbone

    assert isinstance(bb, VARBackbone) and isinstance(bb, MLNBackbone)  # Switti implements the sampler's protocols
    assert same_state(pipe.transformer, snap_t) and same_state(pipe.vqvae, snap_v)


def test_long_prompts_are_truncated_and_reported(pipe):
    long = " and ".join(["a large red circle at the top left"] * 12)
    out = pipe(random_image(), PS, long, config=tiny_mln_config(), output_type="np")
    assert any(w.startswith("target prompt has") and "truncated" in w for w in out.info["warnings"])


def test_custom_pipeline_shim_offline(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_ext.mln import shim_path

    pipe.save_pretrained(tmp_path / "mln")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "mln", custom_pipeline=shim_path(), trust_remote_code=True)
    assert type(loaded).__name__ == "MLNPipeline"
    loaded.set_progress_bar_config(disable=True)
    a = loaded(random_image(), PS, PT, config=tiny_mln_config(), seed=1, output_type="pt").images
    b = pipe(random_image(), PS, PT, config=tiny_mln_config(), seed=1, output_type="pt").images
    assert torch.equal(a, b)


def test_runs_in_bfloat16():
    bf = tiny_mln_pipeline().to(torch.bfloat16)
    out = bf(random_image(), PS, PT, config=tiny_mln_config(), output_type="np")
    assert bf.transformer.dtype == torch.bfloat16 and np.isfinite(out.images).all()
    assert out.images.shape == (1, 16, 16, 3) and out.info["mask_source"] == "auto"


def test_crop_condition_keeps_float32_phases_in_bfloat16(tmp_path):
    """The crop condition's Fourier phases reach ~1e4 rad (``512 * w * 2 pi``); rounded to bf16 they are noise. Cast
    with ``.to(bfloat16)`` or loaded with ``dtype=bfloat16``, the frequencies stay float32 and the bf16 model's
    crop condition matches the fp32 model's (bf16 rounding of the projection only)."""
    from diffusers.models.embeddings import GaussianFourierProjection

    from diffusers_ext.switti import SwittiTransformer
    from diffusers_ext.switti.tiny import TinySwittiConfig, tiny_transformer

    cfg = TinySwittiConfig(embed_dim=64)
    g = torch.Generator().manual_seed(0)
    prompts = (torch.randn(1, 7, 48, generator=g), torch.randn(1, 32, generator=g), torch.zeros(1, 7))
    fp32 = tiny_transformer(cfg)
    ref = fp32.prepare_conditioning(*prompts).crop
    fp32.save_pretrained(tmp_path)

    @torch.no_grad()
    def cosine(m):
        crop = m.prepare_conditioning(*prompts).crop.float()
        return float(torch.nn.functional.cosine_similarity(ref.flatten(), crop.flatten(), dim=0))

    cast = tiny_transformer(cfg).to(torch.bfloat16)
    loaded = SwittiTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for m in (cast, loaded):
        assert m.dtype == torch.bfloat16 and m.crop_embed.weight.dtype == torch.float32
        assert cosine(m) > 0.999
    # what a bf16 copy of the frequencies gives instead (the official pipeline in bf16)
    rounded = tiny_transformer(cfg).to(torch.bfloat16)
    plain = GaussianFourierProjection(rounded.crop_embed.weight.numel(), set_W_to_weight=False, log=False)
    plain.weight.data = rounded.crop_embed.weight.data.bfloat16()
    rounded.crop_embed = plain
    assert cosine(rounded) < 0.95


def test_model_cpu_offload_is_refused_up_front():
    """The sampler calls the models' per-scale methods, which accelerate's forward hooks never see: offload would
    fail mid-edit on a device mismatch, so the pipeline declares no offload sequence and diffusers refuses at once."""
    pipe = tiny_mln_pipeline()
    with pytest.raises(ValueError, match="model_cpu_offload_seq"):
        pipe.enable_model_cpu_offload(device="cpu")


def test_pack_shims_have_unique_file_names():
    """diffusers imports a local shim as diffusers_modules.local.<file name>, so two shims both called pipeline.py
    collide in one process (the suite loads the MLN and critic shims in one process through from_pretrained)."""
    import runpy

    from diffusers_ext.critic import shim_path as critic_shim
    from diffusers_ext.mln import shim_path as mln_shim

    files = [Path(mln_shim()), critic_shim("kontext"), critic_shim("qwen")]
    assert len({f.name for f in files}) == 3 and all(f.name != "pipeline.py" for f in files)
    wanted = ["MLNPipeline", "InlineCriticKontextPipeline", "InlineCriticQwenEditPipeline"]
    for f, cls in zip(files, wanted):
        assert cls in runpy.run_path(str(f)), (f, cls)


def test_refine_keep_mask_tv_spares_what_the_tv_weight_freed(pipe):
    """With an empty mask, official refinement pulls every position back toward the source; ``mask_tv`` leaves the
    tokens the two prompts disagree on (TV weight < 1) partly or wholly as sampled: its output lies between the
    unrefined sample and the official refinement's."""
    img = random_image(seed=4)
    empty = np.zeros((16, 16), np.float32)
    raw = pipe(img, PS, PT, mask=empty, seed=3, output_type="pt", config=tiny_mln_config(refine_steps=0)).images
    official = pipe(img, PS, PT, mask=empty, seed=3, output_type="pt", config=tiny_mln_config()).images
    out = pipe(img, PS, PT, mask=empty, seed=3, output_type="pt", config=tiny_mln_config(refine_keep="mask_tv"))
    assert out.info["refine_tv_scale"] == len(pipe.patch_nums) - 1  # the last scale is TV-weighted (official)
    d_tv, d_official = (out.images - raw).abs().sum(), (official - raw).abs().sum()
    assert 0 < d_tv < d_official


def test_residual_anchor_is_the_source_tokens_over_the_source_prefix(pipe):
    """``anchor="residual"`` re-tokenises the source over the prefix sampled so far. While that prefix is the
    source's own (a huge nudge pins every scale), it is exactly the source's tokens: both anchors give the same
    image. (That it rebuilds the source over an edited prefix is checked on the trained toy model.)"""
    img = random_image(seed=7)
    strong = tiny_mln_config(beta=1e4, alphas=(1e4,) * 4, tv_adaptive=False, refine_steps=0)
    fixed = pipe(img, PS, PT, config=strong, seed=0, output_type="pt").images
    resid = pipe(img, PS, PT, config=strong.replace(anchor="residual"), seed=0, output_type="pt").images
    assert torch.equal(fixed, resid)
    loose = strong.replace(beta=0.0, alphas=(0.0,) * 4)  # no nudge: the anchor must not matter at all
    a = pipe(img, PS, PT, config=loose, seed=0, output_type="pt").images
    b = pipe(img, PS, PT, config=loose.replace(anchor="residual"), seed=0, output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, fixed)

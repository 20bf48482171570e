"""The Switti port: official parameter names and shapes, and its inference path against its training path."""

import json
from pathlib import Path

import pytest
import torch

from diffusers_ext.switti import SwittiTransformer, SwittiVQVAE
from diffusers_ext.switti.loading import transformer_config_from_official, vqvae_config_from_official

TABLE = json.loads((Path(__file__).parent / "data" / "switti_official_state_dict.json").read_text())["models"]


def _shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("repo,config", [("yresearch/Switti", {"depth": 30}),
                                         ("yresearch/Switti-1024", {"depth": 30, "reso": 1024})])
def test_transformer_matches_official_names_and_shapes(repo, config):
    official = TABLE[repo]
    with torch.device("meta"):
        model = SwittiTransformer(**transformer_config_from_official(config))
    ours = _shapes(model)
    params = {k: list(p.shape) for k, p in model.named_parameters()}
    assert params == official["parameters"]  # every parameter, by name and shape (703 tensors, 2.47 B values)
    # buffers: the small level index is kept; the L x L training mask is rebuilt on demand, and ignored on load
    assert set(official["buffers"]) - set(ours) == {"attn_bias_for_masking"}
    assert {k: v for k, v in ours.items() if k not in params} == {"lvl_1L": official["buffers"]["lvl_1L"]}
    assert "attn_bias_for_masking" in "".join(SwittiTransformer._keys_to_ignore_on_load_unexpected)
    assert sum(torch.Size(s).numel() for s in params.values()) == 2_470_518_256 + (7680 if "1024" in repo else 0)


def test_vqvae_matches_official_names_and_shapes():
    official = TABLE["yresearch/VQVAE-Switti"]
    with torch.device("meta"):
        model = SwittiVQVAE(**vqvae_config_from_official({}, reso=1024))
    assert {k: list(p.shape) for k, p in model.named_parameters()} == official["parameters"]
    assert {k: v for k, v in _shapes(model).items() if k not in official["parameters"]} == official["buffers"]
    assert model.downsample == 16


def test_official_config_translation():
    c = transformer_config_from_official({"depth": 30, "rope": True, "use_ar": False, "use_swiglu_ffn": True,
                                          "use_crop_cond": True})
    assert (c["embed_dim"], c["num_heads"], len(c["patch_nums"]), c["patch_nums"][-1]) == (1920, 30, 10, 32)
    c = transformer_config_from_official({"depth": 30, "reso": 1024})
    assert (len(c["patch_nums"]), c["patch_nums"][-1]) == (14, 64)


def _tiny_pair():
    from fixtures_mln import tiny_config

    from diffusers_ext.switti.tiny import tiny_transformer, tiny_vqvae

    cfg = tiny_config()
    model = tiny_transformer(cfg, seed=1)
    for b in model.blocks:  # make every block matter (init_weights starts the gates near zero)
        b.ada_lin[-1].weight.data.normal_(0, 0.05)
        b.crop_cond_scales.data.normal_(0, 0.5)
    return model, tiny_vqvae(cfg, seed=1)


def test_per_scale_inference_equals_teacher_forcing():
    """forward_scale (inference, one scale at a time, cached text K/V) gives the logits of the teacher-forced
    training forward with its block-diagonal mask."""
    model, vq = _tiny_pair()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ctx, pooled = torch.randn(2, 7, model.config.context_dim), torch.randn(2, model.config.pooled_embed_size)
    bias = torch.zeros(2, 7)
    bias[1, 5:] = float("-inf")
    with torch.no_grad():
        idx = vq.img_to_idxBl(x, model.patch_nums)
        full = model(vq.quantize.idxBl_to_switti_input(idx, model.patch_nums), ctx, pooled, bias)
        cond = model.prepare_conditioning(ctx, pooled, bias)
        f_hat = torch.zeros(2, vq.Cvae, model.patch_nums[-1], model.patch_nums[-1])
        for k, (b, e) in enumerate(model.slices):
            h = model.forward_scale(model.scale_input(k, cond, f_hat), k, cond)
            torch.testing.assert_close(model.get_logits(h, cond), full[:, b:e], atol=2e-5, rtol=1e-4)
            pn = model.patch_nums[k]
            code = vq.quantize.embedding(idx[k]).transpose(1, 2).reshape(2, -1, pn, pn)
            f_hat = f_hat + vq.quantize.upsample_code(code, k, len(model.patch_nums), model.patch_nums[-1])


def test_vqvae_tokens_round_trip_through_fhat():
    _, vq = _tiny_pair()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        fhats = vq.img_to_fhat(x)
        idx = vq.img_to_idxBl(x)
        torch.testing.assert_close(vq.idxBl_to_img(idx), vq.fhat_to_img(fhats[-1]))
        assert [t.shape[1] for t in idx] == [p * p for p in vq.v_patch_nums]


def test_cross_attention_processor_is_swappable_and_restorable():
    model, _ = _tiny_pair()
    saved = model.cross_attn_processors
    calls = []

    def spy(attn, q, k, v, bias):
        calls.append(q.shape)
        return saved[0](attn, q, k, v, bias)

    model.set_cross_attn_processor(spy)
    cond = model.prepare_conditioning(torch.randn(1, 5, model.config.context_dim),
                                      torch.randn(1, model.config.pooled_embed_size), None)
    model.forward_scale(model.scale_input(0, cond), 0, cond)
    assert len(calls) == len(model.blocks)
    with pytest.raises(ValueError, match="exactly the keys"):
        model.set_cross_attn_processor({0: spy})
    model.set_cross_attn_processor(saved)
    assert model.cross_attn_processors == saved

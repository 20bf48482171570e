"""Inline Critic core: config validation, the shared attention math, error-map maths, weight files."""

import json
import math

import pytest
import torch

from diffusers_ext.critic import CriticConfig, InlineCritic, core
from diffusers_ext.errors import EditSteerConfigError, ModelFamilyError, WeightsError

FLUX = dict(arch="flux", width=32, depth=4, num_heads=2, num_double=2, context_dim=32)


# -- config -----------------------------------------------------------------------------------------------------
def test_config_block_modes_and_defaults():
    cfg = CriticConfig(**FLUX, l_in=1, mode="steer")
    assert cfg.l_c == (2,)  # l_in + a third of the remaining depth
    assert [cfg.block_mode(i) for i in range(4)] == ["dormant", "read", "steer", "steer"]
    assert [cfg.block_mode(i, "critique") for i in range(4)] == ["dormant", "read", "read", "read"]
    assert {cfg.block_mode(i, "off") for i in range(4)} == {"off"}
    assert cfg.replace(steer_start=3).block_mode(2) == "read"


@pytest.mark.parametrize("bad, match", [
    (dict(l_in=4), "past the model's depth"),
    (dict(l_in=0, l_c=(9,)), "past the model's depth"),
    (dict(l_in=2, l_c=(1,)), "before the insertion layer"),
    (dict(mode="stear"), "unknown mode 'stear'"),
    (dict(stream="image"), "not implemented"),
    (dict(n_tokens=0), "n_tokens"),
    (dict(steer_scale=-1.0), "steer_scale"),
    (dict(num_heads=3), "not divisible"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(EditSteerConfigError, match=match):
        CriticConfig(**{**FLUX, **bad})


def test_config_round_trips_through_metadata():
    cfg = CriticConfig(**FLUX, l_in=1, l_c=(2, 3), n_tokens=2, adapter_rank=3, base_model="x", stage=3)
    meta = cfg.metadata()
    assert {"arch", "base_model", "width", "depth", "l_in", "l_c", "n_c", "placement", "stage",
            "pack_version"} <= set(meta)
    assert CriticConfig.from_metadata(meta) == cfg
    with pytest.raises(ModelFamilyError, match="pack_version"):
        CriticConfig.from_metadata({**meta, "pack_version": "99"})
    with pytest.raises(ModelFamilyError, match="not an EditSteer Inline Critic"):
        CriticConfig.from_metadata({"format": "pt"})


def test_placement_is_checked_on_load_and_the_old_qwen_placement_loads_with_a_warning(caplog):
    """The weight file records where the critic rows sit. Qwen critics written before the rows moved from after the
    padded text to after each sample's own prompt load with a warning (the same positions unpadded); any other
    placement is refused."""
    from diffusers_ext.critic.config import LEGACY_PLACEMENT, PLACEMENT

    qwen = CriticConfig(arch="qwen-image", width=48, depth=3, num_heads=3, context_dim=16, l_in=1)
    meta = qwen.metadata()
    assert meta["placement"] == PLACEMENT["qwen-image"] and "own unpadded prompt" in meta["placement"]
    with caplog.at_level("WARNING", logger="diffusers_ext.critic.config"):
        assert CriticConfig.from_metadata(meta, source="new.safetensors") == qwen
        assert not caplog.records
        old = {**meta, "placement": LEGACY_PLACEMENT["qwen-image"][0]}
        assert CriticConfig.from_metadata(old, source="old.safetensors") == qwen
    assert "old.safetensors" in caplog.text and "padded" in caplog.text
    assert qwen.metadata()["placement"] == PLACEMENT["qwen-image"]  # saving again records the current one
    flux = CriticConfig(**FLUX, l_in=1)
    for cfg, bad in ((qwen, "text stream, somewhere else"), (flux, LEGACY_PLACEMENT["qwen-image"][0]),
                     (flux, None)):
        m = {k: v for k, v in cfg.metadata().items() if k != "placement"}
        if bad is not None:
            m["placement"] = bad
        with pytest.raises(ModelFamilyError, match="places its critic rows as"):
            CriticConfig.from_metadata(m, source="x.safetensors")


# -- attention math -----------------------------------------------------------------------------------------------
def _qkv(b=2, s=11, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g) for _ in range(3)]


def _ref_attention(q, k, v, bias):
    """Plain softmax attention on BSHD with an additive key bias (B|1, S)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("grad", [False, True])
def test_read_mode_hides_the_critic_and_lets_it_read_everything(grad):
    q, k, v = _qkv()
    start, n = 4, 2
    with torch.set_grad_enabled(grad):
        out = core.critic_attention(q.clone(), k.clone(), v.clone(), start=start, n_c=n, block_mode="read")
    main = [core.drop_rows(x, start, n) for x in (q, k, v)]
    assert torch.equal(core.drop_rows(out, start, n), core.sdpa_bshd(*main, None))  # the frozen call, bit for bit
    # the critic's queries attend over every key (main and critic) with no bias
    full = _ref_attention(q, k, v, torch.zeros(1, q.shape[1]))
    torch.testing.assert_close(core.take_rows(out, start, n), core.take_rows(full, start, n), atol=1e-5, rtol=0)


def test_steer_mode_is_joint_attention_with_a_log_scale_bias():
    q, k, v = _qkv()
    start, n = 4, 1
    torch.testing.assert_close(core.critic_attention(q, k, v, start=start, n_c=n, block_mode="steer"),
                               core.sdpa_bshd(q, k, v, None))
    bias = torch.zeros(1, q.shape[1])
    bias[:, start:start + n] = math.log(0.3)
    torch.testing.assert_close(core.critic_attention(q, k, v, start=start, n_c=n, block_mode="steer", scale=0.3),
                               _ref_attention(q, k, v, bias), atol=1e-5, rtol=0)
    read = core.critic_attention(q.clone(), k.clone(), v.clone(), start=start, n_c=n, block_mode="read")
    torch.testing.assert_close(core.critic_attention(q.clone(), k.clone(), v.clone(), start=start, n_c=n,
                                                     block_mode="steer", scale=0.0), read)


@pytest.mark.parametrize("grad", [False, True])
def test_decoupled_steer_adds_a_gated_critic_only_attention_to_the_frozen_one(grad):
    q, k, v = _qkv()
    start, n = 4, 2
    mask = torch.ones(2, q.shape[1], dtype=torch.bool)
    mask[1, 1:3] = False
    gate = torch.tensor([0.7, -1.3])
    kw = dict(start=start, n_c=n, key_mask=mask)
    with torch.set_grad_enabled(grad):
        read = core.critic_attention(q.clone(), k.clone(), v.clone(), block_mode="read", **kw)
        out = core.critic_attention(q.clone(), k.clone(), v.clone(), block_mode="steer", gate=gate, scale=0.5, **kw)
        zero = core.critic_attention(q.clone(), k.clone(), v.clone(), block_mode="steer", gate=torch.zeros(2), **kw)
    assert torch.equal(zero, read)  # a zero gate (the initial state) is exactly the critique mode
    # the critic rows only read; every other row adds softmax(q k_c) v_c over the critic keys alone, times the gate
    torch.testing.assert_close(core.take_rows(out, start, n), core.take_rows(read, start, n), atol=0, rtol=0)
    kc, vc = core.take_rows(k, start, n), core.take_rows(v, start, n)
    extra = _ref_attention(q, kc, vc, torch.zeros(1, n)) * (0.5 * gate).view(1, 1, 2, 1)
    torch.testing.assert_close(core.drop_rows(out, start, n), core.drop_rows(read + extra, start, n), atol=1e-5,
                               rtol=0)
    # the frozen keys' attention is not renormalised: a masked key still has no influence
    k2, v2 = k.clone(), v.clone()
    k2[1, 1:3] += 5
    v2[1, 1:3] -= 5
    out2 = core.critic_attention(q.clone(), k2, v2, block_mode="steer", gate=gate, scale=0.5, **kw)
    torch.testing.assert_close(out[1], out2[1], atol=1e-6, rtol=0)


def test_decoupled_critic_has_zero_gates_on_steering_blocks_and_round_trips(tmp_path):
    c = _critic(steer_attention="decoupled", mode="steer")
    assert sorted(c.gates) == ["2", "3"] and all(torch.count_nonzero(g) == 0 for g in c.gates.values())
    assert c.gate_for(1) is None and c.config.metadata()["steer_attention"] == "decoupled"
    with torch.no_grad():
        c.gates["3"].fill_(0.25)
    c.save_pretrained(tmp_path / "c")
    d = InlineCritic.from_pretrained(tmp_path / "c")
    assert d.config.steer_attention == "decoupled" and torch.equal(d.gates["3"], c.gates["3"])
    with pytest.raises(EditSteerConfigError, match="steer_attention"):
        CriticConfig(**FLUX, steer_attention="sideways")


def test_key_mask_is_honoured_and_inplace_path_matches_autograd_path():
    q, k, v = _qkv()
    mask = torch.ones(2, q.shape[1], dtype=torch.bool)
    mask[1, 1:3] = False
    adapter = (torch.randn(3, 16, 2) * 0.3, torch.randn(3, 2, 16) * 0.3)
    for mode in ("read", "dormant", "steer"):
        for scale in (1.0, 0.5):
            kw = dict(start=4, n_c=1, block_mode=mode, scale=scale, key_mask=mask, adapter=adapter)
            with torch.no_grad():
                a = core.critic_attention(q.clone(), k.clone(), v.clone(), **kw)
            b = core.critic_attention(q.clone(), k.clone(), v.clone(), **kw)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a masked key has no influence on the output
    k2, v2 = k.clone(), v.clone()
    k2[1, 1:3] += 5
    v2[1, 1:3] -= 5
    for mode in ("read", "steer"):
        a = core.critic_attention(q, k, v, start=4, n_c=1, block_mode=mode, key_mask=mask)
        b = core.critic_attention(q, k2, v2, start=4, n_c=1, block_mode=mode, key_mask=mask)
        torch.testing.assert_close(a[1], b[1])


def test_dormant_rows_are_zero_and_a_new_adapter_is_the_identity():
    q, k, v = _qkv()
    out = core.critic_attention(q, k, v, start=4, n_c=1, block_mode="dormant")
    assert torch.count_nonzero(out[:, 4]) == 0
    down, up = torch.randn(3, 16, 4), torch.zeros(3, 4, 16)
    x = torch.randn(2, 1, 2, 8)
    assert torch.equal(core.lowrank_residual(x, down[0], up[0]), x)


# -- error maps, ranks ----------------------------------------------------------------------------------------------
def test_log_normalise_and_spearman():
    e = torch.tensor([[0.0, 1.0, 3.0, 100.0], [2.0, 2.0, 2.0, 2.0]])
    n = core.log_normalise(e)
    torch.testing.assert_close(n.mean(-1), torch.ones(2))
    assert n[0, 3] / n[0, 1] < 100  # the huge error is compressed
    assert core.rank(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 0.0, 1.5, 1.5]
    a = torch.rand(3, 50)
    torch.testing.assert_close(core.spearman(a, a.exp()), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(core.spearman(a, -a), -torch.ones(3, dtype=torch.float64))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])  # d^2 sum = 4 -> 1 - 6*4/(5*24) = 0.8
    assert float(core.spearman(x, y)) == pytest.approx(0.8)
    assert torch.isnan(core.spearman(x, torch.ones(5)))


# -- weight files -------------------------------------------------------------------------------------------------
def _critic(**kw):
    torch.manual_seed(0)
    return InlineCritic(CriticConfig(**{**FLUX, "l_in": 1, "adapter_rank": 2, **kw}))


def test_save_load_round_trip(tmp_path):
    c = _critic()
    c.save_pretrained(tmp_path / "c")
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"critic.safetensors", "config.json"}
    assert json.loads((tmp_path / "c" / "config.json").read_text())["l_in"] == 1
    for src in (tmp_path / "c", tmp_path / "c" / "critic.safetensors", c):
        d = InlineCritic.from_pretrained(src)
        assert d.config == c.config
        for (ka, a), (kb, b) in zip(c.state_dict().items(), d.state_dict().items()):
            assert ka == kb and torch.equal(a, b)
    with pytest.raises(WeightsError, match="no critic weights"):
        InlineCritic.from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="not a file, a folder"):
        InlineCritic.from_pretrained("no-such-critic-id")


def test_a_hub_repo_id_is_downloaded_only_when_allowed(monkeypatch):
    """As every download of the pack: the Hugging Face cache always, the Hub only with allow_download (the Hub is
    out of reach here, so a recorder stands in for hf_hub_download)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from diffusers_ext.weights import resolver

    calls = []

    def record(*args, local_files_only, **kwargs):
        calls.append(local_files_only)
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", record)
    monkeypatch.setattr(resolver, "hub_offline", lambda: False)
    monkeypatch.delenv("EDITSTEER_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsError, match="downloads are off"):
        InlineCritic.from_pretrained("org/my-critic", allow_download=False)
    with pytest.raises(WeightsError, match="downloads are off"):
        InlineCritic.from_pretrained("org/my-critic")  # the default: EDITSTEER_ALLOW_DOWNLOAD unset
    with pytest.raises(WeightsError) as e:
        InlineCritic.from_pretrained("org/my-critic", allow_download=True)
    assert "downloads are off" not in str(e.value)
    assert calls == [True, True, False]


def test_hub_layout_and_manifest_resolution_with_sha_check(tmp_path, hf_cache, monkeypatch):
    from diffusers_ext.tiny import write_hf_cache_repo
    from diffusers_ext.weights import entry_from_folder, write_entry

    c = _critic(stage=2)
    c.save_pretrained(tmp_path / "src")
    write_hf_cache_repo(hf_cache, "editsteer-test/tiny-critic", tmp_path / "src")
    assert InlineCritic.from_pretrained("editsteer-test/tiny-critic").config == c.config  # offline, from the cache
    with pytest.raises(WeightsError, match="Hub repo"):
        InlineCritic.from_pretrained("editsteer-test/missing-critic")

    store = tmp_path / "store" / "tiny-critic"
    c._save_pretrained(store)
    art = entry_from_folder(store, id="tiny-critic", description="t", kind="folder", base_model="flux-kontext",
                            license="apache-2.0", repo_id="editsteer/tiny-critic",
                            include=("critic.safetensors", "config.json"))
    write_entry(art, tmp_path / "manifest")
    monkeypatch.setenv("EDITSTEER_MANIFEST_DIR", str(tmp_path / "manifest"))
    monkeypatch.setenv("EDITSTEER_WEIGHTS_DIR", str(tmp_path / "store"))
    assert InlineCritic.from_pretrained("tiny-critic").config == c.config
    data = bytearray((store / "critic.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor
    (store / "critic.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256|no valid copy"):
        InlineCritic.from_pretrained("tiny-critic")


def test_compatibility_check_names_the_mismatch():
    c = _critic()
    desc = dict(arch="flux", **{k: FLUX[k] for k in ("width", "depth", "num_heads", "num_double", "context_dim")},
                **{"class": "FluxTransformer2DModel"})
    c.check_compatible(desc)
    with pytest.raises(ModelFamilyError, match="'flux' family.*'qwen-image'"):
        c.check_compatible({**desc, "arch": "qwen-image", "class": "QwenImageTransformer2DModel"})
    with pytest.raises(ModelFamilyError, match="width=32.*width=3072"):
        c.check_compatible({**desc, "width": 3072})


def test_critique_head_reads_image_and_critic_states():
    c = _critic()
    h, cr = torch.randn(2, 16, 32), torch.randn(2, 1, 32)
    e = c.critique(2, h, cr)
    assert e.shape == (2, 16) and e.dtype == torch.float32
    e.sum().backward()
    assert c.heads["2"].in_h.weight.grad is not None and c.heads["2"].in_c.weight.grad is not None
    assert not torch.equal(c.critique(2, h, cr + 1), e.detach())


# -- steering adapters ---------------------------------------------------------------------------------------------
def _lowrank(x, first, down, up, scale, film=None):
    """Reference for core.steer_rows: rows [first:) of BSHD x get scale * ((x @ down) * film) @ up."""
    b, s, h, d = x.shape
    flat = x.reshape(b, s, h * d).clone()
    z = flat[:, first:] @ down
    if film is not None:
        z = z * film[:, None, :]
    flat[:, first:] += scale * (z @ up)
    return flat.reshape(b, s, h, d)


@pytest.mark.parametrize("layout", ["bshd", "from_bhsd"])
def test_steer_rows_in_place_writes_into_x_whatever_its_strides(layout):
    """The in-place path (inference) adds into ``x`` itself, with the fused product where the heads flatten into a
    view and the plain add where they do not (a BHSD tensor transposed to BSHD), and equals the reference."""
    g = torch.Generator().manual_seed(3)
    b, s, h, d, r, first = 2, 9, 2, 8, 3, 4
    x = torch.randn(b, s, h, d, generator=g)
    if layout == "from_bhsd":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert x.stride(-2) != d
    down, up = torch.randn(h * d, r, generator=g), torch.randn(r, h * d, generator=g)
    film = torch.randn(b, r, generator=g)
    ref = _lowrank(x, first, down, up, 0.5, film)
    y = x.clone() if layout == "bshd" else x.clone().transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        out = core.steer_rows(y, first, down, up, 0.5, film, inplace=True)
    assert out is y
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(core.steer_rows(x, first, down, up, 0.5, film), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_steer_adapters_correct_the_image_rows_of_qkv_and_output_scaled_by_the_critic(grad):
    q, k, v = _qkv()
    start, n, w, r = 4, 2, 16, 3
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, w, r, generator=g) * 0.3, torch.randn(4, r, w, generator=g) * 0.3
    film = torch.randn(4, n * w, r, generator=g) * 0.1
    kw = dict(start=start, n_c=n, block_mode="steer", scale=0.5)
    with torch.set_grad_enabled(grad):
        plain = core.critic_attention(q.clone(), k.clone(), v.clone(), **kw)
        zero = core.critic_attention(q.clone(), k.clone(), v.clone(), steer_adapter=(down, torch.zeros_like(up)),
                                     **kw)
        out = core.critic_attention(q.clone(), k.clone(), v.clone(), steer_adapter=(down, up, film), **kw)
        read = core.critic_attention(q.clone(), k.clone(), v.clone(), **{**kw, "block_mode": "read"})
        read_a = core.critic_attention(q.clone(), k.clone(), v.clone(), steer_adapter=(down, up, film),
                                       **{**kw, "block_mode": "read"})
        off = core.critic_attention(q.clone(), k.clone(), v.clone(), steer_adapter=(down, up, film),
                                    **{**kw, "scale": 0.0})
    assert torch.equal(zero, plain)  # a new adapter (up = 0) is the identity
    assert torch.equal(read_a, read) and torch.equal(off, read)  # only steer blocks with scale > 0 use it
    # reference: the film from the critic's value rows, low-rank corrections of rows after the critic
    vc = core.take_rows(v, start, n).reshape(2, n, w)
    f = 1 + torch.einsum("bi,pir->pbr", torch.nn.functional.layer_norm(vc, (w,), eps=1e-6).reshape(2, n * w), film)
    first = start + n
    qa, ka, va = (_lowrank(x, first, down[i], up[i], 0.5, f[i]) for i, x in enumerate((q, k, v)))
    bias = core.steer_key_bias(None, q.shape[1], start, n, 0.5, 2, q.device, q.dtype)
    ref = _lowrank(_ref_attention(qa, ka, va, bias), first, down[3], up[3], 0.5, f[3])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, core.critic_attention(q.clone(), k.clone(), v.clone(), steer_adapter=(down, up),
                                                          **kw))  # the film (the critic's state) matters


@pytest.mark.parametrize("conditioned", [True, False])
def test_steer_adapter_critic_starts_as_the_plain_critic_and_round_trips(tmp_path, conditioned):
    c = _critic(steer_rank=3, steer_conditioned=conditioned, mode="steer")
    assert sorted(c.steer_adapters) == ["2", "3"] and c.steer_adapter_for(1) is None
    a = c.steer_adapters["3"]
    assert torch.count_nonzero(a.up) == 0 and (a.film is None) != conditioned
    assert c.config.metadata()["steer_rank"] == "3"
    with torch.no_grad():
        a.up.normal_(0, 0.1)
        if conditioned:
            a.film.normal_(0, 0.1)
    c.save_pretrained(tmp_path / "c")
    d = InlineCritic.from_pretrained(tmp_path / "c")
    assert d.config.steer_rank == 3 and d.config.steer_conditioned == conditioned
    assert all(torch.equal(x, y) for x, y in zip(d.steer_adapters["3"].pair(), a.pair()))
    with pytest.raises(EditSteerConfigError, match="steer_rank"):
        CriticConfig(**FLUX, steer_rank=-1)


def test_flow_matching_loss_weights_the_edit_tokens():
    g = torch.Generator().manual_seed(0)
    v_hat, v_star = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    edit = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    per_token = (v_hat - v_star).pow(2).mean(-1)
    assert torch.allclose(core.flow_matching_loss(v_hat, v_star), torch.nn.functional.mse_loss(v_hat, v_star))
    assert torch.allclose(core.flow_matching_loss(v_hat, v_star, edit, 0.0), per_token.mean())
    w = 1 + 3 * edit.float()
    assert torch.allclose(core.flow_matching_loss(v_hat, v_star, edit, 3.0), (per_token * w).sum() / w.sum())
    fm, fm_edit = core.fm_sums(v_hat, v_star, edit)
    assert fm == pytest.approx(per_token.mean().item()) and fm_edit == pytest.approx(per_token[edit].mean().item())
    assert core.fm_sums(v_hat, v_star)[1] is None

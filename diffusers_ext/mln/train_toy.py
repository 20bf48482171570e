"""``editsteer train mln-toy``: the toy Switti (tiny VQ-VAE, then tiny transformer + tiny CLIP encoders).

Both models are the real classes (:class:`~diffusers_ext.switti.SwittiVQVAE`, :class:`~diffusers_ext.switti.
SwittiTransformer`, ``transformers.CLIPTextModel``) at toy size, trained on toy-world scenes (32 px, one to four
shapes on a plain background) and their captions (:meth:`diffusers_ext.toy.world.Scene.caption`):

1. ``--stage vqvae``: the multi-scale residual VQ-VAE (scales 1-2-3-4-6-8 on an 8 x 8 grid) with an L2 + L1
   reconstruction loss and the official commitment/codebook loss; unused codes are re-seeded from encoder features.
   ``--stage decoder`` then fine-tunes only ``post_quant_conv`` + ``decoder`` on the frozen tokeniser's features
   (quantised ``f_hat`` and, a quarter of the time, the continuous ``f`` that MLN's refinement moves toward): the
   tokens do not change, so a transformer trained on them stays valid.
2. ``--stage switti``: the scale-wise transformer, teacher-forced on the frozen VQ-VAE's tokens (cross-entropy over
   every scale), jointly with the two tiny CLIP text encoders (a toy choice: the real Switti keeps CLIP frozen);
   captions are dropped to the empty prompt 10% of the time, for classifier-free guidance.

Each stage stops at ``--steps`` or ``--time-limit-min``, whichever comes first, checkpoints every
``--checkpoint-every`` steps (safetensors; optimizer state too) and resumes from the last checkpoint with
``--resume``. ``--register`` copies the final pipeline to ``diffusers_ext/assets/toy-switti`` and writes its
weight-manifest entry.

Example::

    editsteer train mln-toy --stage all --out runs/mln-toy --threads 2 --register
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

HELP = "train the toy Switti (tiny VQ-VAE, then tiny transformer + CLIP encoders) on toy-world captions"
ARTIFACT_ID = "toy-switti"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", choices=("vqvae", "decoder", "switti", "all"), default="all",
                   help="what to train (all = vqvae, decoder, switti)")
    p.add_argument("--out", default="runs/mln-toy", help="run folder (checkpoints, logs, final models)")
    p.add_argument("--vqvae-steps", type=int, default=6000)
    p.add_argument("--switti-steps", type=int, default=20000)
    p.add_argument("--decoder-steps", type=int, default=1500)
    p.add_argument("--vqvae-batch", type=int, default=16)
    p.add_argument("--switti-batch", type=int, default=16)
    p.add_argument("--vqvae-lr", type=float, default=2e-3)
    p.add_argument("--switti-lr", type=float, default=1e-3)
    p.add_argument("--partial-captions", type=float, default=0.5,
                   help="share of training captions that name a random subset of the objects only (real prompts "
                        "leave most of an image out; 0: always the full scene description)")
    p.add_argument("--time-limit-min", type=float, default=30.0, help="wall-clock limit per stage")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (2 on an idle 2-core machine: 1.3-1.5x faster than 1; on cores shared with "
                        "other jobs, 2 threads can run these small kernels many times slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue a stage from its last checkpoint")
    p.add_argument("--register", action="store_true",
                   help=f"copy the final pipeline into diffusers_ext/assets/{ARTIFACT_ID} and write the manifest entry")


# ----------------------------------------------------------------------------------------------------------------
# data


def scene_batch(rng, n: int, partial: float = 0.0):
    """``n`` random toy scenes (1-4 objects): (uint8 images N x 32 x 32 x 3, captions); with probability
    ``partial`` a caption names a random subset of the objects only (:func:`~diffusers_ext.mln.captions.
    partial_caption`), else every object."""
    import numpy as np

    from ..toy import world as W
    from .captions import partial_caption

    imgs, caps = [], []
    for _ in range(n):
        s = W.random_scene(rng, 1, W.MAX_OBJECTS)
        imgs.append(W.render(s))
        caps.append(partial_caption(s, rng, p_full=1.0 - partial) if partial > 0 else s.caption())
    return np.stack(imgs), caps


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (safetensors for tensors, JSON for the rest: nothing is unpickled on resume)


def _save_ckpt(path: Path, models: dict, opt, step: int, extra: dict) -> None:
    from ..weights import save_safetensors

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in models.items() for k, v in m.state_dict().items()}
    st = opt.state_dict()
    for i, s in st["state"].items():
        for k, v in s.items():
            tensors[f"optim.{i}.{k}"] = v.detach().reshape(v.shape).contiguous() if hasattr(v, "shape") else v
    save_safetensors(tensors, path / "state.safetensors")
    meta = {"step": step, "param_groups": st["param_groups"], **extra}
    (path / "state.json").write_text(json.dumps(meta, indent=1))


def _load_ckpt(path: Path, models: dict, opt) -> dict:
    from ..weights import load_safetensors

    tensors = load_safetensors(path / "state.safetensors")
    meta = json.loads((path / "state.json").read_text())
    for name, m in models.items():
        pre = name + "."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _lr(step: int, total: int, base: float, elapsed: float, limit: float, warmup: int = 100) -> float:
    """Warmup, then cosine decay over the run; progress is steps or wall-clock, whichever is further along, so a
    time-limited run still ends at a low learning rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), elapsed / max(limit, 1e-9))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class _Log:
    def __init__(self, path: Path):
        self.f = open(path, "a")

    def __call__(self, **kw):
        self.f.write(json.dumps(kw) + "\n")
        self.f.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()),
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# stage 1: VQ-VAE


def train_vqvae(args, out: Path) -> Path:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from ..switti.tiny import TOY_SWITTI_CONFIG, tiny_vqvae
    from ..toy import world as W

    acc = Accelerator(cpu=True)
    cfg = TOY_SWITTI_CONFIG
    vq = tiny_vqvae(cfg, seed=args.seed).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=args.vqvae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vq, opt = acc.prepare(vq, opt)
    ck = out / "vqvae-ckpt"
    step, spent = 0, 0.0
    if args.resume and (ck / "state.json").exists():
        meta = _load_ckpt(ck, {"vqvae": acc.unwrap_model(vq)}, opt)
        step, spent = meta["step"], meta["wall_s"]
    log = _Log(out / "vqvae_log.jsonl")
    rng = np.random.default_rng(args.seed * 7919 + step)
    t0 = time.perf_counter() - spent
    V = cfg.vocab_size
    hits = torch.zeros(V)
    while step < args.vqvae_steps and (time.perf_counter() - t0) < args.time_limit_min * 60:
        imgs, _ = scene_batch(rng, args.vqvae_batch)
        x = W.to_tensor(imgs)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.vqvae_steps, args.vqvae_lr, time.perf_counter() - t0, args.time_limit_min * 60)
        rec, vq_loss, used = vq(x)
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        step += 1
        for u in used:
            hits += torch.bincount(u, minlength=V).float()
        if step % 50 == 0:  # re-seed dead codes from encoder features of the current batch
            m = acc.unwrap_model(vq)
            dead = (hits == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    f = m.img_to_f(x).permute(0, 2, 3, 1).reshape(-1, m.Cvae)
                    pick = f[torch.randint(0, f.shape[0], (len(dead),))] * 0.5
                    m.quantize.embedding.weight.data[dead] = pick
            psnr = -10 * math.log10(F.mse_loss(rec.detach().clamp(-1, 1).add(1).div(2), x.add(1).div(2)).item())
            log(stage="vqvae", step=step, lr=opt.param_groups[0]["lr"], loss=loss.item(), rec=rec_loss.item(), vq=vq_loss.item(), psnr=psnr,
                codes_used=int((hits > 0).sum()), dead_reseeded=int(len(dead)), wall_s=time.perf_counter() - t0)
            hits.zero_()
        if step % args.checkpoint_every == 0:
            _save_ckpt(ck, {"vqvae": acc.unwrap_model(vq)}, opt, step, {"wall_s": time.perf_counter() - t0})
    wall = time.perf_counter() - t0
    final = out / "vqvae"
    acc.unwrap_model(vq).eval().save_pretrained(final)
    _save_ckpt(ck, {"vqvae": acc.unwrap_model(vq)}, opt, step, {"wall_s": wall})
    _record_time(out, "vqvae", step, wall, args)
    return final


def train_decoder(args, out: Path) -> Path:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..switti import SwittiVQVAE
    from ..toy import world as W

    vq = SwittiVQVAE.from_pretrained(out / "vqvae", use_safetensors=True)
    vq.requires_grad_(False).eval()
    params = [*vq.post_quant_conv.parameters(), *vq.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    vq.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.vqvae_lr * 0.5, betas=(0.9, 0.99), weight_decay=0.0)
    ck = out / "decoder-ckpt"
    step, spent = 0, 0.0
    if args.resume and (ck / "state.json").exists():
        meta = _load_ckpt(ck, {"vqvae": vq}, opt)
        step, spent = meta["step"], meta["wall_s"]
    log = _Log(out / "decoder_log.jsonl")
    rng = np.random.default_rng(args.seed * 31337 + step)
    t0 = time.perf_counter() - spent
    base = args.vqvae_lr * 0.5
    while step < args.decoder_steps and (time.perf_counter() - t0) < args.time_limit_min * 60:
        imgs, _ = scene_batch(rng, args.vqvae_batch)
        x = W.to_tensor(imgs)
        with torch.no_grad():
            f = vq.img_to_f(x)
            z = f if rng.random() < 0.25 else vq.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.decoder_steps, base, time.perf_counter() - t0, args.time_limit_min * 60)
        rec = vq.decoder(vq.post_quant_conv(z))
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            psnr = -10 * math.log10(F.mse_loss(rec.detach().clamp(-1, 1).add(1).div(2), x.add(1).div(2)).item())
            log(stage="decoder", step=step, lr=opt.param_groups[0]["lr"], loss=loss.item(), psnr=psnr,
                wall_s=time.perf_counter() - t0)
        if step % args.checkpoint_every == 0:
            _save_ckpt(ck, {"vqvae": vq}, opt, step, {"wall_s": time.perf_counter() - t0})
    wall = time.perf_counter() - t0
    _save_ckpt(ck, {"vqvae": vq}, opt, step, {"wall_s": wall})
    vq.requires_grad_(False).eval().save_pretrained(out / "vqvae")
    if (out / "pipeline" / "vqvae").is_dir():  # a transformer already trained on these (unchanged) tokens
        vq.save_pretrained(out / "pipeline" / "vqvae")
    _record_time(out, "decoder", step, wall, args)
    return out / "vqvae"


# ----------------------------------------------------------------------------------------------------------------
# stage 2: transformer + text encoders


def train_switti(args, out: Path) -> Path:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from ..switti import SwittiPipeline, SwittiVQVAE
    from ..switti.text import encode_prompts
    from ..switti.tiny import TOY_SWITTI_CONFIG, tiny_text_encoders, tiny_transformer
    from ..toy import world as W
    from ..weights import hub_key_layout

    acc = Accelerator(cpu=True)
    cfg = TOY_SWITTI_CONFIG.__class__(**{**TOY_SWITTI_CONFIG.__dict__, "words": tuple(W.vocabulary())})
    vq = SwittiVQVAE.from_pretrained(out / "vqvae", use_safetensors=True).eval().requires_grad_(False)
    model = tiny_transformer(cfg, seed=args.seed).train()
    tok, te, tok2, te2 = tiny_text_encoders(cfg, seed=args.seed)
    te.train()
    te2.train()
    params = [*model.parameters(), *te.parameters(), *te2.parameters()]
    opt = torch.optim.AdamW(params, lr=args.switti_lr, betas=(0.9, 0.95), weight_decay=0.01)
    ck = out / "switti-ckpt"
    modules = {"transformer": model, "text_encoder": te, "text_encoder_2": te2}
    step, spent = 0, 0.0
    if args.resume and (ck / "state.json").exists():
        meta = _load_ckpt(ck, modules, opt)
        step, spent = meta["step"], meta["wall_s"]
    model, te, te2, opt = acc.prepare(model, te, te2, opt)
    log = _Log(out / "switti_log.jsonl")
    rng = np.random.default_rng(args.seed * 104729 + step)
    t0 = time.perf_counter() - spent
    pns = cfg.patch_nums
    ema = None
    while step < args.switti_steps and (time.perf_counter() - t0) < args.time_limit_min * 60:
        imgs, caps = scene_batch(rng, args.switti_batch, partial=args.partial_captions)
        caps = ["" if rng.random() < 0.1 else c for c in caps]
        with torch.no_grad():
            idx = vq.img_to_idxBl(W.to_tensor(imgs), pns)
            tf = vq.quantize.idxBl_to_switti_input(idx, pns)
        enc = encode_prompts(caps, tok, te, tok2, te2, device="cpu", grad=True)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.switti_steps, args.switti_lr, time.perf_counter() - t0, args.time_limit_min * 60)
        logits = model(tf, enc.embeds, enc.pooled, enc.bias)
        target = torch.cat(idx, 1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            with torch.no_grad():
                per = [F.cross_entropy(logits[:, b:e].reshape(-1, logits.shape[-1]), target[:, b:e].reshape(-1)).item()
                       for b, e in acc.unwrap_model(model).slices]
            log(stage="switti", step=step, loss=loss.item(), loss_ema=ema, loss_per_scale=[round(v, 3) for v in per],
                wall_s=time.perf_counter() - t0)
        if step % args.checkpoint_every == 0:
            _save_ckpt(ck, {k: acc.unwrap_model(m) for k, m in zip(modules, (model, te, te2))}, opt, step,
                       {"wall_s": time.perf_counter() - t0})
    wall = time.perf_counter() - t0
    _save_ckpt(ck, {k: acc.unwrap_model(m) for k, m in zip(modules, (model, te, te2))}, opt, step, {"wall_s": wall})
    pipe = SwittiPipeline(transformer=acc.unwrap_model(model).eval(), vqvae=vq, text_encoder=acc.unwrap_model(te).eval(),
                          tokenizer=tok, text_encoder_2=acc.unwrap_model(te2).eval(), tokenizer_2=tok2)
    final = out / "pipeline"
    pipe.save_pretrained(final)
    hub_key_layout(final)  # CLIP keys as on the Hub, loadable by every transformers 5.x
    (final / "editsteer_toy.json").write_text(json.dumps(
        {"preset": "toy", "resolution": W.IMAGE_SIZE, "trained_steps": step, "wall_s": round(wall, 1)}, indent=1) + "\n")
    _record_time(out, "switti", step, wall, args)
    return final


def _record_time(out: Path, stage: str, steps: int, wall: float, args) -> None:
    import torch

    f = out / "times.json"
    d = json.loads(f.read_text()) if f.exists() else {}
    d[stage] = {"steps": steps, "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
                "command": " ".join(["editsteer", "train", "mln-toy", *sys.argv[3:]]) if len(sys.argv) > 2 else None}
    f.write_text(json.dumps(d, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------


def register(out: Path, command: str) -> Path:
    """Copy the trained pipeline into the pack's assets and write its manifest entry."""
    from ..weights import entry_from_folder, write_entry
    from ..weights.manifest import assets_dir

    src = out / "pipeline"
    dst = assets_dir() / ARTIFACT_ID
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}
    art = entry_from_folder(
        dst, id=ARTIFACT_ID, kind="diffusers-pipeline", base_model="switti", license="apache-2.0",
        description="Toy Switti (SwittiPipeline: tiny scale-wise transformer, tiny multi-scale VQ-VAE, two tiny CLIP "
                    "text encoders) trained on EditSteer's toy world, 32 px, scales 1-2-3-4-6-8; the default model "
                    "of MLN's toy benchmark and ComfyUI workflow.",
        status="unpublished", repo_id=f"editsteer/{ARTIFACT_ID}", bundled_path=ARTIFACT_ID, produced_by=command,
        extra={"training": times})
    write_entry(art)
    return dst


def run(args) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("vqvae", "all"):
        print(f"[mln-toy] stage vqvae -> {train_vqvae(args, out)}", file=sys.stderr)
    if args.stage in ("decoder", "all"):
        print(f"[mln-toy] stage decoder -> {train_decoder(args, out)}", file=sys.stderr)
    if args.stage in ("switti", "all"):
        if not (out / "vqvae" / "config.json").exists():
            from ..errors import EditSteerConfigError

            raise EditSteerConfigError(f"no trained VQ-VAE in {out / 'vqvae'}; run --stage vqvae first")
        print(f"[mln-toy] stage switti -> {train_switti(args, out)}", file=sys.stderr)
    if args.register:
        cmd = " ".join(["editsteer", "train", "mln-toy", *[a for a in sys.argv[3:] if a != "--register"]])
        print(f"[mln-toy] registered {register(out, cmd)}", file=sys.stderr)
    return 0

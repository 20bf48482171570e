"""``editsteer train toy-editor``: train the tiny FLUX.1-Kontext-class editor on the toy world.

The editor is a ``FluxKontextPipeline`` whose transformer (``FluxTransformer2DModel``), VAE (``AutoencoderKL``), text
encoders (``CLIPTextModel`` + ``T5EncoderModel``) and tokenizers (``CLIPTokenizer`` + ``T5Tokenizer`` over the toy
world's vocabulary) are tiny instances of the classes FLUX.1 Kontext uses. Two stages:

1. **vae**: the autoencoder learns to reconstruct toy scenes (MSE + L1, a tiny KL term). It bounds the editor's
   background fidelity, so it trains first, alone, then is frozen; its ``shift_factor``/``scaling_factor`` are set
   from the latent statistics, as for the real FLUX VAE.
2. **editor**: the transformer and both text encoders learn rectified flow matching in exactly the convention the
   pipeline samples with. Latents, ids and text embeddings come from the pipeline's own ``prepare_latents``
   (VAE encode in argmax mode, shift/scale, ``_pack_latents``, ``_prepare_latent_image_ids`` with the condition's
   axis 0 set to 1) and ``encode_prompt``; ``x_t = (1 - s) x0 + s eps``, target ``v = eps - x0``, the condition
   tokens appended after the noisy tokens, ``timestep = s`` (the pipeline passes ``t / 1000``). ``s`` is drawn
   logit-normal and then shifted with the same ``mu`` the pipeline computes for the 64-token sequence, so training
   sees the sigmas sampling visits. The text encoders train too: Flux gives text tokens no positions (their ids are
   zeros), so word order ("make the red circle blue" vs "make the blue circle red") must come from the encoder, and
   a frozen random encoder carries it poorly. A share of prompts is dropped to "" so true CFG is available.

It runs under ``accelerate`` (``accelerate launch -m diffusers_ext train toy-editor ...`` on several GPUs works
unchanged: data and noise are sharded by process), checkpoints in safetensors only (model, EMA and optimizer
state; ``--resume`` continues bit-for-bit from the last checkpoint since every step's data and noise are a pure
function of ``(--seed, stage, step, process)``), logs losses to ``train_log.jsonl`` and stops at ``--max-minutes``.
Each stage's learning rate follows warmup + cosine (to 10%) over ``max(step / steps, elapsed / time budget)`` of that
stage, so a time-bounded run on a busy machine still anneals.

Example::

    editsteer train toy-editor --out runs/toy-editor --threads 2 --max-minutes 30
    editsteer train toy-editor --out runs/toy-editor --resume            # continue after an interruption
    editsteer edit --model runs/toy-editor/pipeline                       # use the result
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HELP = "train the tiny FLUX.1-Kontext-class toy editor (flow matching, accelerate, resumable)"

ARTIFACT_ID = "toy-kontext-editor"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/toy-editor", help="run folder: checkpoint/, train_log.jsonl, pipeline/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data stream and noise")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock budget of the whole run (both stages)")
    p.add_argument("--vae-minutes", type=float, default=5.0, help="time cap of the VAE stage")
    p.add_argument("--vae-steps", type=int, default=800, help="step cap of the VAE stage")
    p.add_argument("--steps", type=int, default=100_000, help="step cap of the editor stage")
    p.add_argument("--batch-size", type=int, default=16, help="per-process batch of the editor stage")
    p.add_argument("--vae-batch-size", type=int, default=12,
                   help="per-process scenes of a VAE step (each case gives its source and target)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the editor stage (AdamW)")
    p.add_argument("--vae-lr", type=float, default=3e-3, help="peak learning rate of the VAE stage")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps of the editor stage")
    p.add_argument("--vae-l1", type=float, default=0.0, help="L1 weight added to the VAE's MSE loss")
    p.add_argument("--vae-warmup", type=int, default=30, help="linear warmup steps of the VAE stage")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the editor weights (0: off)")
    p.add_argument("--edit-weight", type=float, default=3.0,
                   help="extra loss weight on tokens that overlap the edit mask (0: plain flow matching)")
    p.add_argument("--init", default="positional", choices=("positional", "adaln-zero", "default"),
                   help="transformer init: 'positional' (diffusers' default, but the first double block's "
                        "attention starts as a sharp same-position kernel over the noisy and condition tokens, see "
                        "positional_copy_init_), 'adaln-zero' (DiT) or diffusers' default")
    p.add_argument("--copy-gain", type=float, default=3.0, help="QK gain of the positional init (sharpness)")
    p.add_argument("--qk-gain", type=float, default=1.0,
                   help="initial gain of the attention QK-RMSNorms (diffusers: 1); larger lets attention be sharp "
                        "from the start")
    p.add_argument("--vae-from", default=None,
                   help="start from this trained AutoencoderKL folder and skip the VAE stage (for experiments)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="share of prompts dropped to '' (for true CFG)")
    # model shape
    p.add_argument("--dim", type=int, default=128, help="transformer width (a multiple of --head-dim)")
    p.add_argument("--head-dim", type=int, default=64,
                   help="attention head width; RoPE axes get (8, (h-8)/2, (h-8)/2) of it (frame, row, column)")
    p.add_argument("--double-blocks", type=int, default=1)
    p.add_argument("--single-blocks", type=int, default=3)
    p.add_argument("--qk-norm-lr", type=float, default=10.0,
                   help="learning-rate multiplier of the attention QK-RMSNorm gains (they set how sharp attention "
                        "can be, and sharp positional attention is what copies the condition image)")
    p.add_argument("--text-dim", type=int, default=64, help="T5 width = joint_attention_dim")
    p.add_argument("--vae-channels", default="16,32", help="AutoencoderKL block_out_channels (2 levels: scale 2)")
    p.add_argument("--max-sequence-length", type=int, default=16, help="T5 context length")
    p.add_argument("--inference-steps", type=int, default=8, help="steps recorded in editsteer_toy.json")
    # bookkeeping
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=1000, help="held-out edit evaluation (0: only at the end)")
    p.add_argument("--eval-cases", type=int, default=48, help="held-out cases of each evaluation (0: none)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--bundle", action="store_true",
                   help=f"also install the result as the bundled '{ARTIFACT_ID}' and register its manifest entry")


# ----------------------------------------------------------------------------------------------------------------
# building blocks (importable for tests and other recipes)


def model_config(args):
    from ..tiny import TinyKontextConfig
    from . import world as W

    hd = args.head_dim
    if hd < 16 or hd % 4 or args.dim % hd:
        raise ValueError(f"--head-dim must be a multiple of 4 (>= 16) dividing --dim; got {hd} and {args.dim}")
    side = (hd - 8) // 2
    ch = tuple(int(c) for c in str(args.vae_channels).split(","))
    if len(ch) != 2:
        raise ValueError("--vae-channels names two levels (VAE scale factor 2), e.g. 16,32")
    return TinyKontextConfig(
        num_layers=args.double_blocks, num_single_layers=args.single_blocks, attention_head_dim=hd,
        num_attention_heads=args.dim // hd, axes_dims_rope=(8, side, side), latent_channels=4,
        vae_block_out_channels=ch, vae_norm_num_groups=8 if min(ch) >= 8 else 1, text_dim=args.text_dim,
        pooled_dim=32, words=tuple(W.vocabulary()))


def build_pipeline(args):
    from diffusers import FluxKontextPipeline

    from ..tiny import tiny_kontext_components

    return FluxKontextPipeline(**tiny_kontext_components(model_config(args), seed=args.seed))


def adaln_zero_(transformer) -> None:
    """DiT's adaLN-Zero initialisation on a ``FluxTransformer2DModel``: the modulation layers of every block and of
    the output norm, and the output projection, start at zero, so every block is the identity at step 0 and the
    model predicts v = 0. Only values change: the config and state-dict layout stay standard."""
    import torch

    mods = [transformer.norm_out.linear, transformer.proj_out]
    for b in transformer.transformer_blocks:
        mods += [b.norm1.linear, b.norm1_context.linear]
    for b in transformer.single_transformer_blocks:
        mods.append(b.norm.linear)
    with torch.no_grad():
        for m in mods:
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()


def param_groups(named: dict, qk_norm_lr: float = 1.0, weight_decay: float = 0.01) -> list[dict]:
    """AdamW groups: matrices decay; biases, norms and embeddings' gains do not; the QK-RMSNorm gains of the
    attention layers get ``qk_norm_lr`` x the learning rate."""
    qk = [p for n, p in named.items() if ".norm_q." in n or ".norm_k." in n or "norm_added_q" in n
          or "norm_added_k" in n]
    qk_ids = {id(p) for p in qk}
    rest = [(n, p) for n, p in named.items() if id(p) not in qk_ids]
    decay = [p for n, p in rest if p.ndim >= 2]
    no_decay = [p for n, p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
    if qk:
        groups.append({"params": qk, "weight_decay": 0.0, "lr_mult": float(qk_norm_lr)})
    return groups


def positional_copy_init_(transformer, gain: float = 3.0, pairs: int = 3) -> None:
    """Start the first double block's image attention as a sharp same-position kernel.

    Copying the condition image is most of an editor's job, and a Kontext-style model can only copy through
    attention from each noisy token to the condition token at the same (row, column) (same RoPE position, frame 1
    instead of 0). From a random init that routing is slow to find: QK-RMSNorm caps the logits, and only the
    highest RoPE frequencies tell neighbouring positions apart. So the image queries and keys of the first block
    start as one constant vector (zero weights, equal biases) with its energy on the ``pairs`` highest-frequency
    rotary pairs of the row and column axes, and the QK-norm gains on those dimensions at ``gain``. Each noisy
    token then attends to itself and to the condition token at its position (equal logits: the frame axis is left
    out), with neighbours ~``exp(-0.8 gain^2)`` below. All weights keep training; only values change, so the model
    stays a standard ``FluxTransformer2DModel``.
    """
    import torch

    block = transformer.transformer_blocks[0] if len(transformer.transformer_blocks) else \
        transformer.single_transformer_blocks[0]
    attn = block.attn
    axes = list(transformer.config.axes_dims_rope)
    hd = attn.head_dim
    c = torch.zeros(hd)
    off = axes[0]
    for n in axes[1:]:
        for j in range(min(pairs, n // 2)):
            c[off + 2 * j] = 1.0
        off += n
    heads = attn.inner_dim // hd
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.copy_(c.repeat(heads))
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight[c != 0] = gain


def sequence_mu(pipe, image_seq_len: int) -> float:
    """The timestep shift ``mu`` the pipeline uses for ``image_seq_len`` noisy tokens (its ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    c = pipe.scheduler.config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def sample_sigmas(n: int, mu: float, generator):
    """Logit-normal u, then the scheduler's exponential time shift with ``mu`` (FLUX's training distribution)."""
    import torch

    u = torch.sigmoid(torch.randn(n, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def _step_generator(seed: int, stage: str, step: int, rank: int):
    import torch

    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + rank) * 2 + (stage == "editor"))


def train_batch(seed: int, stage: str, step: int, rank: int, world_size: int, batch: int):
    """Training cases of one step for one process: a pure function of its arguments (resumable, sharded)."""
    from . import world as W

    first = (step * world_size + rank) * batch
    offset = 0 if stage == "editor" else 10_000_000
    return [W.make_case("train", seed, offset + first + j) for j in range(batch)]


class EditorObjective:
    """Flow-matching loss of the editor on a batch of toy cases, through the pipeline's own preprocessing.

    A ``torch.nn.Module`` (built lazily so importing this file stays light) holding the trainable parts
    (transformer, text encoders); the frozen VAE, tokenizers and scheduler stay with the pipeline.
    """

    def __new__(cls, pipe, **kw):
        import torch

        class _Objective(torch.nn.Module):
            def __init__(self, pipe, *, mu: float, max_sequence_length: int, edit_weight: float, p_uncond: float):
                super().__init__()
                self.transformer = pipe.transformer
                self.text_encoder = pipe.text_encoder
                self.text_encoder_2 = pipe.text_encoder_2
                self._pipe = [pipe]  # not a submodule: the VAE is frozen and stays out of DDP/optimiser
                self.mu, self.max_sequence_length = mu, max_sequence_length
                self.edit_weight, self.p_uncond = edit_weight, p_uncond

            def forward(self, source, target, prompts, token_mask, generator):
                return editor_loss(self._pipe[0], source, target, prompts, token_mask, generator, mu=self.mu,
                                   max_sequence_length=self.max_sequence_length, edit_weight=self.edit_weight,
                                   p_uncond=self.p_uncond)

        return _Objective(pipe, **kw)


def _vae_objective(vae, l1: float = 0.0):
    """The VAE stage's loss as a module (so DDP sees a forward): MSE (+ ``l1`` x L1) of the reconstruction of the
    posterior mode, plus a tiny KL term that keeps the posterior well-formed."""
    import torch

    class _VAEObjective(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.mode()).sample.float()
            mse = (rec - x).pow(2).mean()
            return mse + l1 * (rec - x).abs().mean() + 1e-6 * post.kl().mean(), mse

    return _VAEObjective(vae)


def encode_pair(pipe, source, target, generator):
    """Noise, packed target latents x0, packed condition latents and the concatenated ids, exactly as the
    pipeline's ``prepare_latents`` makes them for ``image=source`` (the target goes through the same path)."""
    import torch

    b = source.shape[0]
    c = pipe.transformer.config.in_channels // 4
    h, w = source.shape[-2:]
    dtype = pipe.transformer.dtype
    device = source.device
    with torch.no_grad():
        noise, cond, latent_ids, image_ids = pipe.prepare_latents(source, b, c, h, w, dtype, device, generator)
        _, x0, _, _ = pipe.prepare_latents(target, b, c, h, w, dtype, device, generator, latents=noise)
    return noise, x0, cond, torch.cat([latent_ids, image_ids], dim=0)


def editor_loss(pipe, source, target, prompts, token_mask, generator, *, mu, max_sequence_length, edit_weight=0.0,
                p_uncond=0.0):
    import torch

    b = source.shape[0]
    noise, x0, cond, ids = encode_pair(pipe, source, target, generator)
    drop = torch.rand(b, generator=generator) < p_uncond
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=source.device,
                                                         max_sequence_length=max_sequence_length)
    sigma = sample_sigmas(b, mu, generator).to(source.device, x0.dtype)
    s = sigma[:, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.ones(b, device=source.device)
    pred = pipe.transformer(hidden_states=torch.cat([x_t, cond], dim=1), timestep=sigma, guidance=guidance,
                            pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                            img_ids=ids, return_dict=False)[0][:, : x_t.shape[1]]
    err = (pred.float() - (noise - x0).float()).pow(2).mean(-1)  # [B, tokens]
    weight = 1.0 + edit_weight * token_mask.to(err)
    return (err * weight).sum() / weight.sum()


def token_masks(masks, latent_hw: int):
    """Pixel edit masks [B, H, W] -> packed-token masks [B, (latent_hw/2)^2] (a token is 'edit' if any of its
    pixels is)."""
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(masks, dtype=torch.float32)[:, None]
    k = m.shape[-1] // (latent_hw // 2)
    return F.max_pool2d(m, k).flatten(1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (safetensors only)


def _optimizer_tensors(opt, prefix="opt."):
    tensors, meta = {}, {"param_groups": []}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            import torch

            tensors[f"{prefix}{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    meta["param_groups"] = sd["param_groups"]
    return tensors, meta


def _load_optimizer(opt, tensors, meta, prefix="opt."):
    state: dict = {}
    for name, v in tensors.items():
        if not name.startswith(prefix):
            continue
        i, k = name[len(prefix):].split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, *, modules: dict, ema: dict | None, opt, state: dict) -> None:
    from ..weights import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            if v.data_ptr() in seen:  # tied weights (T5's shared / embed_tokens) are stored once
                continue
            seen.add(v.data_ptr())
            tensors[f"{name}.{k}"] = v.detach().cpu()
    save_safetensors(tensors, folder / "model.safetensors")
    if ema:
        save_safetensors({k: v.cpu() for k, v in ema.items()}, folder / "ema.safetensors")
    if opt is not None:
        ot, meta = _optimizer_tensors(opt)
        save_safetensors({k: v.cpu() for k, v in ot.items()}, folder / "optimizer.safetensors",
                         metadata={"param_groups": json.dumps(meta["param_groups"])})
    tmp = folder / "state.json.partial"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(folder / "state.json")


def load_checkpoint(folder: Path, *, modules: dict):
    from ..weights import load_safetensors, read_safetensors_metadata

    state = json.loads((folder / "state.json").read_text())
    tensors = load_safetensors(folder / "model.safetensors")
    for name, m in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        own = m.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
        if unexpected or untied:
            raise RuntimeError(f"checkpoint {folder} does not match the model '{name}': missing {untied}, "
                               f"unexpected {unexpected}")
    ema = load_safetensors(folder / "ema.safetensors") if (folder / "ema.safetensors").is_file() else None
    opt = None
    if (folder / "optimizer.safetensors").is_file():
        meta = read_safetensors_metadata(folder / "optimizer.safetensors")
        opt = (load_safetensors(folder / "optimizer.safetensors"), {"param_groups": json.loads(meta["param_groups"])})
    return state, ema, opt


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(pipe, cases: int, seed: int = 0, batch: int = 16) -> dict:
    """Held-out edit metrics of ``pipe`` on ``cases`` cases (overall and per family), at the toy settings."""
    import numpy as np

    from . import metrics as M
    from . import world as W
    from .editor import toy_edit

    cs = W.make_cases(cases, "heldout", seed)
    per = []
    for i in range(0, cases, batch):
        chunk = cs[i:i + batch]
        out = toy_edit(pipe, [c.source for c in chunk], [c.instruction for c in chunk], seed=seed * 100_003 + i)
        per += [(c.family, M.case_metrics(o, c.target, c.mask, c.source)) for c, o in zip(chunk, out.image)]
    res = {"overall": M.aggregate([m for _, m in per])}
    for fam in W.FAMILIES:
        rows = [m for f, m in per if f == fam]
        if rows:
            res[fam] = M.aggregate(rows)
    res["n"] = int(len(per))
    return {k: ({kk: float(np.round(vv, 5)) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in res.items()}


def format_eval(ev: dict) -> str:
    fams = [f for f in ev if f not in ("overall", "n")]
    o = ev["overall"]
    s = (f"success {o['edit_success_rate']:.2f} region_mse {o['edit_region_mse']:.4f} "
         f"bg_psnr {o['background_psnr']:.1f} | ")
    return s + " ".join(f"{f[:5]} {ev[f]['edit_success_rate']:.2f}" for f in fams)


# ----------------------------------------------------------------------------------------------------------------
# the command


def _lr_factor(step: int, steps: int, elapsed: float, budget_s: float, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(step / max(steps, 1), elapsed / max(budget_s, 1e-9)))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _images(cases, key):
    import torch

    from . import world as W

    return torch.stack([W.to_tensor(getattr(c, key)) for c in cases])


def run(args) -> int:
    import numpy as np
    import torch
    from accelerate import Accelerator

    from ..errors import EditSteerConfigError
    from ..weights import hub_key_layout
    from . import world as W
    from .editor import DEFAULT_SETTINGS, write_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_config(args)
    except ValueError as e:
        raise EditSteerConfigError(str(e)) from None
    out = Path(args.out)
    ckpt_dir = out / "checkpoint"
    if args.resume and not (ckpt_dir / "state.json").is_file():
        raise EditSteerConfigError(f"--resume: no checkpoint in {ckpt_dir}; run once without --resume first")
    if not args.resume and (ckpt_dir / "state.json").is_file():
        raise EditSteerConfigError(f"{ckpt_dir} already holds a checkpoint: pass --resume to continue it, or choose "
                                   "another --out")

    acc = Accelerator(mixed_precision=args.mixed_precision)
    dev, rank, world_size = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"

    def log(entry: dict, echo: str | None = None):
        if main:
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if echo:
                print(echo, file=sys.stderr, flush=True)

    pipe = build_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    pipe._editsteer_toy_settings = {**DEFAULT_SETTINGS, "max_sequence_length": args.max_sequence_length,
                                    "num_inference_steps": args.inference_steps}
    state = {"stage": "vae", "vae_step": 0, "step": 0, "elapsed_s": 0.0, "args": {k: v for k, v in vars(args).items()
                                                                                    if not k.startswith("_")}}
    trainables = {"vae": pipe.vae, "transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
                  "text_encoder_2": pipe.text_encoder_2}
    if args.init == "adaln-zero":
        adaln_zero_(pipe.transformer)
    elif args.init == "positional":
        positional_copy_init_(pipe.transformer, gain=args.copy_gain)
    if args.qk_gain != 1.0:
        with torch.no_grad():
            for n, prm in pipe.transformer.named_parameters():
                if any(f".{k}." in n for k in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                    prm.fill_(args.qk_gain)
    ema_state = opt_state = None
    if args.vae_from and not args.resume:
        from diffusers import AutoencoderKL

        trained = AutoencoderKL.from_pretrained(args.vae_from, use_safetensors=True)
        pipe.vae.load_state_dict(trained.state_dict())
        shift, scale = trained.config.shift_factor, trained.config.scaling_factor
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        state.update(stage="editor", vae_shift_factor=shift, vae_scaling_factor=scale, vae_end_s=0.0)
    if args.resume:
        state, ema_state, opt_state = load_checkpoint(ckpt_dir, modules=trainables)
        if "vae_shift_factor" in state:
            pipe.vae.register_to_config(shift_factor=state["vae_shift_factor"],
                                        scaling_factor=state["vae_scaling_factor"])
        print(f"resumed {ckpt_dir}: stage {state['stage']}, vae step {state['vae_step']}, step {state['step']}",
              file=sys.stderr)
    state["command"] = " ".join(["editsteer", "train", "toy-editor"] + sys.argv[3:]) \
        if sys.argv[1:3] == ["train", "toy-editor"] else " ".join(sys.argv)
    budget_s = args.max_minutes * 60.0
    t_start = time.perf_counter() - state["elapsed_s"]

    def elapsed():
        return time.perf_counter() - t_start

    def checkpoint(opt, ema=None):
        state["elapsed_s"] = elapsed()
        if main:
            save_checkpoint(ckpt_dir, modules={k: acc.unwrap_model(m) for k, m in trainables.items()}, ema=ema,
                            opt=opt, state=state)

    pipe.to(dev)

    # ---------------- stage 1: the VAE
    if state["stage"] == "vae":
        vae = pipe.vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        if opt_state is not None:
            _load_optimizer(opt, *opt_state)
        vae_p, opt = acc.prepare(_vae_objective(vae, args.vae_l1), opt)
        vae_budget = min(args.vae_minutes * 60.0, budget_s)
        t_stage = time.perf_counter()
        stage_t0 = state.get("vae_elapsed_s", 0.0)
        last_log = time.perf_counter()
        while state["vae_step"] < args.vae_steps and stage_t0 + time.perf_counter() - t_stage < vae_budget:
            step = state["vae_step"]
            cases = train_batch(args.seed, "vae", step, rank, world_size, args.vae_batch_size)
            x = torch.cat([_images(cases, "source"), _images(cases, "target")]).to(dev)
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * _lr_factor(step, args.vae_steps, stage_t0 + time.perf_counter() - t_stage,
                                                   vae_budget, args.vae_warmup)
            with acc.autocast():
                loss, mse = vae_p(x)
            acc.backward(loss)
            acc.clip_grad_norm_(vae_p.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["vae_step"] = step + 1
            if (step + 1) % args.log_every == 0 or step == 0:
                now = time.perf_counter()
                psnr = float(-10 * math.log10(max(mse.item() / 4.0, 1e-12)))  # [-1,1] -> [0,1] scale
                log({"stage": "vae", "step": step + 1, "loss": float(loss.item()), "mse": float(mse.item()),
                     "psnr": psnr, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed(), 2),
                     "steps_per_s": round(args.log_every / max(now - last_log, 1e-9), 3) if step else None},
                    echo=f"[vae] step {step + 1} loss {loss.item():.5f} recon psnr {psnr:.1f} dB "
                         f"({elapsed() / 60:.1f} min)")
                last_log = now
            if (step + 1) % args.checkpoint_every == 0:
                state["vae_elapsed_s"] = stage_t0 + time.perf_counter() - t_stage
                checkpoint(opt)
        # freeze; latent statistics set the VAE's shift/scale (as for the real FLUX VAE)
        vae = acc.unwrap_model(vae_p).vae.eval().requires_grad_(False)
        with torch.no_grad():
            cases = train_batch(args.seed, "vae", 9_999_999, 0, 1, 256)
            z = torch.cat([vae.encode(_images(cases, k).to(dev)).latent_dist.mode() for k in ("source", "target")])
        shift, scale = float(z.mean()), float(1.0 / z.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        state.update(stage="editor", vae_shift_factor=shift, vae_scaling_factor=scale,
                     vae_elapsed_s=stage_t0 + time.perf_counter() - t_stage, vae_end_s=elapsed())
        opt_state = None
        del opt, vae_p
        checkpoint(None)
        log({"stage": "vae_done", "step": state["vae_step"], "shift_factor": shift, "scaling_factor": scale,
             "elapsed_s": round(elapsed(), 2)}, echo=f"[vae] frozen: shift {shift:.4f} scale {scale:.4f}")
    pipe.vae.eval().requires_grad_(False)

    # ---------------- stage 2: transformer + text encoders
    mu = sequence_mu(pipe, (W.IMAGE_SIZE // pipe.vae_scale_factor // 2) ** 2)
    objective = EditorObjective(pipe, mu=mu, max_sequence_length=args.max_sequence_length,
                                edit_weight=args.edit_weight, p_uncond=args.p_uncond)
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    named = {n: p for n, p in objective.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(param_groups(named, args.qk_norm_lr), lr=args.lr, betas=(0.9, 0.99))
    if opt_state is not None and state["stage"] == "editor" and state["step"] > 0:
        _load_optimizer(opt, *opt_state)
    ema = None
    if args.ema > 0:
        ema = {n: (ema_state[n].to(dev) if ema_state and n in ema_state else p.detach().clone())
               for n, p in named.items()}
    obj_p, opt = acc.prepare(objective, opt)

    def swap_in_ema():
        """Swap EMA weights into the live modules; returns the raw weights to swap back."""
        if ema is None:
            return None
        raw = {n: p.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(ema[n])
        return raw

    def swap_back(raw):
        if raw is not None:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(raw[n])

    def run_eval(tag):
        if not main or args.eval_cases <= 0:
            return None
        raw = swap_in_ema()
        objective.eval()
        try:
            ev = evaluate(pipe, args.eval_cases, seed=0)
        finally:
            objective.train()
            swap_back(raw)
        log({"stage": "eval", "step": state["step"], "tag": tag, "elapsed_s": round(elapsed(), 2), "heldout": ev},
            echo=f"[eval] step {state['step']}: {format_eval(ev)}")
        return ev

    last_log = time.perf_counter()
    steps_since = 0
    latent_hw = W.IMAGE_SIZE // pipe.vae_scale_factor
    while state["step"] < args.steps and elapsed() < budget_s:
        step = state["step"]
        cases = train_batch(args.seed, "editor", step, rank, world_size, args.batch_size)
        src, tgt = _images(cases, "source").to(dev), _images(cases, "target").to(dev)
        tmask = token_masks(np.stack([c.mask for c in cases]), latent_hw).to(dev)
        gen = _step_generator(args.seed, "editor", step, rank)
        torch.manual_seed(int(gen.initial_seed()) + 1)  # dropout (T5) too: a resumed run repeats this exact step
        # the editor's share of the time budget starts when the VAE stage ended
        editor_t0 = state.get("vae_end_s", 0.0)
        lr = args.lr * _lr_factor(step, args.steps, elapsed() - editor_t0, budget_s - editor_t0, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        with acc.autocast():
            loss = obj_p(src, tgt, [c.instruction for c in cases], tmask, gen)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for n, p in named.items():
                    ema[n].lerp_(p.detach(), 1 - d)
        state["step"] = step + 1
        steps_since += 1
        if (step + 1) % args.log_every == 0 or step == 0:
            now = time.perf_counter()
            sps = steps_since / max(now - last_log, 1e-9)
            log({"stage": "editor", "step": step + 1, "loss": float(loss.item()), "lr": lr,
                 "elapsed_s": round(elapsed(), 2), "steps_per_s": round(sps, 3)},
                echo=f"[editor] step {step + 1} loss {loss.item():.4f} lr {lr:.2e} {sps:.2f} steps/s "
                     f"({elapsed() / 60:.1f} min)")
            last_log, steps_since = now, 0
        if (step + 1) % args.checkpoint_every == 0:
            checkpoint(opt, ema)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            run_eval("periodic")

    checkpoint(opt, ema)
    acc.wait_for_everyone()
    if not main:
        return 0

    # ---------------- export: EMA weights into the pipeline, save_pretrained + settings
    swap_in_ema()
    objective.eval()
    pipe.transformer.eval()
    final = run_eval("final")
    folder = out / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    hub_key_layout(folder)  # CLIP keys as on the Hub, loadable by every transformers 5.x
    write_settings(folder, max_sequence_length=args.max_sequence_length, num_inference_steps=args.inference_steps)
    # the pipeline folder must hold the VAE's final shift/scale and nothing else from training
    record = {"command": state["command"], "threads": torch.get_num_threads(), "processes": world_size,
              "device": str(dev), "vae_steps": state["vae_step"], "editor_steps": state["step"],
              "batch_size": args.batch_size, "wall_s": round(elapsed(), 1),
              "editor_steps_per_s": None, "heldout": final}
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    sps = [r["steps_per_s"] for r in rows if r.get("stage") == "editor" and r.get("steps_per_s")]
    if sps:
        record["editor_steps_per_s"] = round(float(np.median(sps)), 3)
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {folder} ({state['step']} editor steps, {elapsed() / 60:.1f} min)", file=sys.stderr)
    if args.bundle:
        bundle(folder, record)
    return 0


def bundle(folder: Path, record: dict) -> Path:
    """Install a trained pipeline folder as the bundled toy editor and write its manifest entry."""
    import shutil

    from ..weights import entry_from_folder, write_entry
    from ..weights.manifest import assets_dir

    dest = assets_dir() / ARTIFACT_ID
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > 8 * 2**20:
        raise RuntimeError(f"the bundled editor would be {size / 2**20:.1f} MB; the budget is 8 MB")
    art = entry_from_folder(
        dest, id=ARTIFACT_ID, kind="diffusers-pipeline", base_model="flux-kontext", license="apache-2.0",
        description="Tiny FLUX.1-Kontext-class editor (FluxKontextPipeline of tiny FluxTransformer2DModel, "
                    "AutoencoderKL, CLIP + T5 text encoders) trained on the toy world; the embedded default editor.",
        status="unpublished", repo_id=f"editsteer/{ARTIFACT_ID}", bundled_path=ARTIFACT_ID,
        produced_by=record["command"],
        extra={"training": {k: record[k] for k in ("threads", "device", "vae_steps", "editor_steps", "batch_size",
                                                   "wall_s", "editor_steps_per_s")}})
    checkout = Path(__file__).resolve().parents[2]
    manifest_dir = checkout / "weights_manifest" if (checkout / "pyproject.toml").is_file() else None
    path = write_entry(art, manifest_dir)
    print(f"bundled {dest} ({size / 2**20:.2f} MB); manifest {path}", file=sys.stderr)
    return dest

"""How much could *any* training on the critic's data gain? A reference for reading a critic's result.

The Inline Critic keeps the editor frozen and trains a few tokens and adapters. When it gains little, the question
is whether the editor has nothing left to learn from the data, or whether the critic's pathway cannot carry what
there is to learn. This diagnostic answers it by fine-tuning the *whole* transformer (no critic) on the same edit
pairs, with the same stage-3 loss (flow matching, edit tokens weighted ``1 + --edit-weight``), batch size and noise
levels as ``editsteer train critic``, and recording the same validation numbers (``fm``, ``fm_edit`` on fixed
noise) every ``--val-every`` steps. It is a measuring stick, not a method: the fine-tuned editor is not a
critic, and it is never bundled.

``--lora-rank R`` trains a rank-``R`` LoRA on every ``nn.Linear`` of the transformer blocks instead (attention,
MLP and AdaLN modulation; the backbone itself stays frozen), which tells a small adapter *inside* the blocks
apart from the critic's pathway (tokens that later layers attend to) at a like number of parameters.
``--save-pipeline`` merges the LoRA into the weights first, so the saved editor benches like any other.

Example::

    python -m diffusers_ext.critic.headroom --steps 2400 --out runs/critic-headroom --save-pipeline runs/ft-editor
    python -m diffusers_ext.critic.headroom --lora-rank 8 --lr 1e-3 --steps 3200 --out runs/critic-headroom-lora8
    editsteer bench base --model runs/ft-editor --cases 48 --seed 0 --out runs/bench/ft   # same cases as the critic

Writes ``headroom.json`` (the validation curve and the command) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from .core import flow_matching_loss, fm_sums


def validate(transformer, data, seed: int = 123, batch_size: int = 32) -> dict:
    """``fm`` and ``fm_edit`` of the plain transformer on ``data`` with fixed noise (the draws of
    ``train._validate``, so the numbers compare with a critic's ``fm_off`` / ``fm``)."""
    g = torch.Generator().manual_seed(seed)
    fm = fm_edit = 0.0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(data)))
            batch = data.batch(idx)
            x_t, v_star, sigma = data.noised(batch, g)
            a, e = fm_sums(data.forward(transformer, batch, x_t, sigma), v_star, batch.get("edit_tokens"))
            fm += a * len(idx)
            fm_edit += (e or 0.0) * len(idx)
    return {"fm": round(fm / len(data), 6), "fm_edit": round(fm_edit / len(data), 6)}


class LoRALinear(nn.Module):
    """``base(x) + (x @ down) @ up`` around a frozen ``nn.Linear``; ``up`` starts at zero (the identity)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(base.in_features, rank) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.to(x.dtype)) @ self.up.to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the LoRA folded into its weight."""
        self.base.weight += (self.down @ self.up).T.to(self.base.weight.dtype)
        return self.base


def add_lora(transformer, blocks, rank: int) -> list:
    """Wrap every ``nn.Linear`` of ``blocks`` (attention, MLP, AdaLN modulation) in a rank-``rank`` LoRA. Returns
    ``(parent, name, wrapper)`` triples; the wrappers' ``down`` / ``up`` are the trainable parameters."""
    transformer.requires_grad_(False)
    wrapped = []
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    lora = LoRALinear(child, rank)
                    setattr(parent, name, lora)
                    wrapped.append((parent, name, lora))
    return wrapped


def merge_lora(wrapped: list) -> None:
    """Fold every LoRA into its base weight and put the base ``nn.Linear`` back (the model is plain again)."""
    for parent, name, lora in wrapped:
        setattr(parent, name, lora.merged())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusers_ext.critic.headroom", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="editor: manifest id or pipeline folder (default: the toy editor)")
    p.add_argument("--out", default="runs/critic-headroom")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (the toy editor's final rate)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--edit-weight", type=float, default=3.0)
    p.add_argument("--cases", type=int, default=2048)
    p.add_argument("--val-cases", type=int, default=64)
    p.add_argument("--val-every", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train a rank-R LoRA on the block linears instead of the whole transformer (0: whole)")
    p.add_argument("--save-pipeline", default=None, metavar="DIR", help="save the fine-tuned pipeline here")
    args = p.parse_args(argv)
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {args.lora_rank}")

    from ..toy.editor import load_toy_editor
    from .data import KontextEditData

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe, where = load_toy_editor(args.model)
    tr = pipe.transformer
    data = KontextEditData.from_toy_world(pipe, args.cases, split="train", seed=args.seed)
    val = KontextEditData.from_toy_world(pipe, args.val_cases, split="train", seed=args.seed + 1)
    curve = [{"step": 0, **validate(tr, val)}]
    wrapped = []
    if args.lora_rank:
        from .apply import family_of

        wrapped = add_lora(tr, family_of(tr).blocks(tr), args.lora_rank)
        params = [q for _, _, w in wrapped for q in (w.down, w.up)]
        tr.train()
    else:
        tr.requires_grad_(True).train()
        params = [q for q in tr.parameters() if q.requires_grad]
    trained = "lora" if args.lora_rank else "whole transformer"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(hash((args.seed, -1, step)) % (2**63))  # ints only: no hash salt
        batch = data.batch(torch.randint(len(data), (args.batch_size,), generator=g))
        x_t, v_star, sigma = data.noised(batch, g)
        v_hat = data.forward(tr, batch, x_t, sigma)
        loss = flow_matching_loss(v_hat, v_star, batch["edit_tokens"], args.edit_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            tr.eval()
            curve.append({"step": step + 1, **validate(tr, val), "elapsed_s": round(time.perf_counter() - t0, 1)})
            tr.train()
            print(f"[headroom] step {step + 1}/{args.steps} " + json.dumps(curve[-1]), file=sys.stderr, flush=True)
    tr.requires_grad_(False).eval()
    merge_lora(wrapped)
    first, last = curve[0], curve[-1]
    result = {"model": str(where), "command": "python -m diffusers_ext.critic.headroom " + " ".join(
        argv if argv is not None else sys.argv[1:]), "settings": dict(vars(args)),
        "threads": torch.get_num_threads(), "trained": trained, "trainable_params": sum(q.numel() for q in params),
        "curve": curve,
        "change_pct": {k: round(100 * (last[k] / first[k] - 1), 2) for k in ("fm", "fm_edit")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "headroom.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.save_pipeline:
        pipe.save_pretrained(args.save_pipeline)
    print(f"fine-tuning ({trained}, {result['trainable_params']} parameters): "
          f"fm {result['change_pct']['fm']:+.1f} %, fm_edit "
          f"{result['change_pct']['fm_edit']:+.1f} % after {args.steps} steps; wrote {out / 'headroom.json'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

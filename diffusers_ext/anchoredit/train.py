"""``editsteer train anchoredit --stage vae|1|2|3``: AnchorEdit's three training stages (plus the toy VAE).

* ``--stage 1`` single-turn edit pretraining: (source, target) pairs as two frames, the source clean (as at
  inference), plus identity pairs with the empty instruction (``--null-prob``, null-instruction reconstruction).
* ``--stage 2`` causal AR forcing on multi-turn sequences: per-frame timesteps (every frame noised, monotonic upper
  bound), self-rollout (``--self-forcing-prob`` 0.3 after ``--self-forcing-warmup``), history degradation, and the
  turn-weighted flow loss (``--turn-weight-alpha`` 1.0): EditSteer's causal recipe (``methods.md`` 2.6).
* ``--stage 3`` distillation to 4 steps: consistency distillation (``--cd-steps``; student, EMA student and teacher
  from stage 2; teacher one Euler step on a 48-point grid, shift 5) then DMD (``--dmd-steps``; generator from CD,
  real and fake scores from stage 2; steps 1000/750/500/250; one generator update every 5 steps).
* ``--stage vae`` (toy only) trains the toy ``AutoencoderKLWan`` and writes the starting pipeline of stage 1.

Runs under ``accelerate launch`` (multi-GPU / multi-node; FSDP with an accelerate config: full-size Wan needs it),
or plainly on one device. Every stage writes a diffusers pipeline folder (``--out``) and a training state
(``--out``/training_state) every ``--save-every`` steps; ``--resume`` continues from it, and because every step
draws its randomness from ``(--seed, step)`` a resumed run repeats an uninterrupted one. Under accelerate each
process draws its own samples, noise and timesteps (``(--seed, step, process index)``), and all processes draw the
same turn counts and target turns, so that their graphs stay in step.

Example (the toy model, as bundled; see README)::

    editsteer train anchoredit --stage vae --out runs/ae/vae --steps 1500
    editsteer train anchoredit --stage 1 --init runs/ae/vae --out runs/ae/s1 --steps 1500 --lr 3e-4
    editsteer train anchoredit --stage 2 --init runs/ae/s1 --out runs/ae/s2 --steps 1500 --lr 2e-4
    editsteer train anchoredit --stage 3 --init runs/ae/s2 --out runs/ae/s3 --cd-steps 300 --dmd-steps 300

Full size (8 GPUs, FSDP)::

    accelerate launch --config_file fsdp.yaml -m diffusers_ext train anchoredit --stage 2 \\
        --init runs/wan14b-stage1 --data multi_turn.json --out runs/wan14b-stage2 --lr 1e-5 \\
        --batch-size 1 --grad-accum 4 --mixed-precision bf16 --gradient-checkpointing --steps 100000
"""

from __future__ import annotations

import argparse

HELP = "train AnchorEdit on a Wan transformer (stage vae|1|2|3; accelerate; resumable)"
DESCRIPTION = __doc__.split("\n\n")[0] if __doc__ else HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--stage", required=True, choices=("vae", "1", "2", "3"), help="training stage")
    g.add_argument("--out", required=True, help="output pipeline folder (training state in OUT/training_state)")
    g.add_argument("--init", default=None, help="pipeline folder to start from: the previous stage's --out "
                   "(stage 1: a Wan2.1-T2V Diffusers folder or the toy VAE stage)")
    g.add_argument("--data", default="toy", help="'toy' (toy world, train split) or a multi-turn JSON file")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (stages vae, 1, 2)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    g.add_argument("--resume", action="store_true", help="continue from OUT/training_state")
    g.add_argument("--save-every", type=int, default=250, help="write the training state every N steps")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    g.add_argument("--gradient-checkpointing", action="store_true")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=None, help="per device (default: 32 pairs / 8 sequences)")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (official: 1e-5 stage 2, 5e-6 CD, "
                   "1e-6 DMD generator)")
    o.add_argument("--lr-gen", type=float, default=None,
                   help="DMD generator learning rate (default 0.2 x --lr: official 1e-6 vs CD 5e-6)")
    o.add_argument("--lr-critic", type=float, default=None, help="DMD fake-score learning rate (default --lr)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--max-grad-norm", type=float, default=10.0)
    o.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    e = p.add_argument_group("sampler recorded in the exported stage-1/2 pipeline (official validation: 50/8/5)")
    e.add_argument("--flow-steps", type=int, default=50)
    e.add_argument("--flow-shift", type=float, default=8.0)
    e.add_argument("--flow-guidance", type=float, default=5.0)
    m = p.add_argument_group("AnchorEdit memory during training (default: the --init pipeline's)")
    m.add_argument("--sink", type=int, default=None)
    m.add_argument("--window", type=int, default=None, help="0 = full cache")
    m.add_argument("--rope-stride", type=int, default=None)
    d = p.add_argument_group("data")
    d.add_argument("--max-turns", type=int, default=8, help="turns per training sequence (at most)")
    d.add_argument("--min-turns", type=int, default=1)
    d.add_argument("--pool-cases", type=int, default=4096, help="toy: distinct single-turn cases")
    d.add_argument("--pool-sequences", type=int, default=1024, help="toy: distinct sequences")
    s1 = p.add_argument_group("stage 1")
    s1.add_argument("--null-prob", type=float, default=0.1, help="share of identity pairs (empty instruction)")
    s1.add_argument("--timestep-sampling", default="uniform", choices=("uniform", "logit-normal"),
                    help="target timestep of stage 1: uniform in [20, 980] (the official ratios) or logit-normal "
                         "(SD3's, denser at mid noise)")
    s2 = p.add_argument_group("stage 2")
    s2.add_argument("--self-forcing-prob", type=float, default=0.3)
    s2.add_argument("--self-forcing-warmup", type=int, default=500)
    s2.add_argument("--turn-weight-alpha", type=float, default=1.0)
    s2.add_argument("--no-degradation", action="store_true")
    s2.add_argument("--no-monotonic", action="store_true", help="the released bidirectional-ablation schedules")
    s2.add_argument("--clean-history-prob", type=float, default=0.0,
                    help="EditSteer option (not in the official recipe): share of samples whose history frames "
                         "before a random cut are clean (t = context timestep, no loss), as at inference")
    s3 = p.add_argument_group("stage 3")
    s3.add_argument("--cd-steps", type=int, default=0)
    s3.add_argument("--dmd-steps", type=int, default=0)
    s3.add_argument("--cd-n", type=int, default=48)
    s3.add_argument("--cd-shift", type=float, default=5.0)
    s3.add_argument("--cd-history", default="gt", choices=("gt", "rollout"),
                    help="history frames of CD: ground truth (the released trainer) or a 4-step student rollout")
    s3.add_argument("--teacher-guidance", type=float, default=3.0, help="CD teacher CFG (1 = off)")
    s3.add_argument("--ema-decay", type=float, default=0.999)
    s3.add_argument("--real-guidance", type=float, default=6.0,
                    help="DMD real-score CFG, official form cond + g (cond - uncond) (0 = off)")
    s3.add_argument("--gen-update-ratio", type=int, default=5, help="one generator update every N DMD steps")
    s3.add_argument("--dmd-turns", type=int, default=5, help="turns per DMD/CD sequence")
    s3.add_argument("--negative-prompt", default=None, help="uncond text of the CFG branches")


def run(args) -> int:
    from .trainer import train

    return train(args)

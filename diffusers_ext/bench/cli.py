"""``editsteer bench METHOD [--cases N] [--seed S] [--out DIR] [method options]``."""

from __future__ import annotations

import argparse

HELP = "benchmark a method on held-out toy-world cases (writes results.json and grid.png)"
DESCRIPTION = (HELP + ". Same --cases/--seed give the same cases and per-case seeds for every method, so runs "
               "compare case by case. `editsteer bench METHOD --help` lists a method's options.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .registry import METHODS, load_method
    from ..errors import EditSteerConfigError

    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in METHODS:
        try:
            cls = load_method(name)
        except EditSteerConfigError:
            q = sub.add_parser(name, help="(not available in this build)")
            q.set_defaults(_bench_unavailable=name)
            _common(q, "single")
            continue
        q = sub.add_parser(name, help=cls.description, description=cls.description)
        _common(q, cls.kind)
        cls.add_arguments(q)
        q.set_defaults(_bench_cls=cls)


def _common(q: argparse.ArgumentParser, kind: str) -> None:
    q.add_argument("--cases", type=int, default=24 if kind == "single" else 8,
                   help="number of held-out cases (sequences for multi-turn methods)")
    q.add_argument("--seed", type=int, default=0, help="selects the held-out cases and the per-case seeds")
    q.add_argument("--out", default=None, help="output folder (default: runs/bench/METHOD)")
    q.add_argument("--split", default="heldout", choices=("heldout", "train", "any"))
    q.add_argument("--families", default=None, help="comma-separated edit families (default: all)")
    if kind == "multiturn":
        q.add_argument("--turns", type=int, default=12, help="turns per sequence")
    q.add_argument("--quiet", action="store_true", help="no per-case progress lines")


def run(args) -> int:
    from ..errors import EditSteerConfigError
    from ..toy import world as W
    from . import harness
    from .registry import load_method

    if getattr(args, "_bench_unavailable", None):
        load_method(args._bench_unavailable)  # raises the clear error
    if args.cases < 1:
        raise EditSteerConfigError("--cases must be at least 1")
    fams = None
    if args.families:
        fams = tuple(f.strip() for f in args.families.split(",") if f.strip())
        unknown = [f for f in fams if f not in W.FAMILIES]
        if unknown:
            raise EditSteerConfigError(f"unknown families {unknown}; known: {', '.join(W.FAMILIES)}")
    method = args._bench_cls(args)
    out = args.out or f"runs/bench/{method.name}"
    res = harness.run(method, cases=args.cases, seed=args.seed, out=out, split=args.split, families=fams,
                      turns=getattr(args, "turns", 12), progress=not args.quiet,
                      command=getattr(args, "_command", None))
    print("\n".join(harness.summary_lines(res)))
    print(f"wrote {out}/results.json and {out}/grid.png")
    return 0

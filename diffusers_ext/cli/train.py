"""``editsteer train RECIPE ...``: training commands (accelerate; resumable). Each recipe lives with its method."""

from __future__ import annotations

import argparse
import importlib

HELP = "train a model (toy editor, Inline Critic, toy Switti/VQ-VAE, AnchorEdit)"

# recipe -> module exposing HELP, add_arguments(parser), run(args)
RECIPES: dict[str, str] = {
    "toy-editor": "diffusers_ext.toy.train_editor",
    "critic": "diffusers_ext.critic.train",
    "mln-toy": "diffusers_ext.mln.train_toy",
    "anchoredit": "diffusers_ext.anchoredit.train",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, modname in RECIPES.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if not e.name or not modname.startswith(e.name):
                raise
            q = sub.add_parser(name, help="(not available in this build)")
            q.set_defaults(_train_unavailable=f"training recipe '{name}' is not available in this build")
            continue
        q = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(q)
        q.set_defaults(_train_run=mod.run)


def run(args) -> int:
    from ..errors import EditSteerError

    if getattr(args, "_train_unavailable", None):
        raise EditSteerError(args._train_unavailable)
    return int(args._train_run(args) or 0)

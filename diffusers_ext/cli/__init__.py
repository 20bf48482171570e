"""The ``editsteer`` command line (also ``python -m diffusers_ext``).

Subcommands live in their own modules, imported when the parser is built. Each exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports (torch, diffusers) inside ``run`` so that
``editsteer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys

from .._version import __version__
from ..errors import EditSteerError

# name -> module. Order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "edit": "diffusers_ext.cli.edit",
    "weights": "diffusers_ext.cli.weights",
    "bench": "diffusers_ext.bench.cli",
    "compare": "diffusers_ext.bench.compare",
    "train": "diffusers_ext.cli.train",
    "probe": "diffusers_ext.critic.probe",
}
DEFAULT_SUBCOMMAND = "edit"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editsteer",
        description="EditSteer: instruction-based image editing methods for diffusers and ComfyUI. "
        f"Without a subcommand, runs `editsteer {DEFAULT_SUBCOMMAND}` (an offline edit on the bundled toy editor).",
    )
    parser.add_argument("--version", action="version", version=f"editsteer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if not e.name or not (modname == e.name or modname.startswith(e.name + ".")):
                raise
            p = sub.add_parser(name, help="(not available in this build)")
            p.set_defaults(_unavailable=f"`editsteer {name}` is not available in this build ({modname} is missing)")
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def with_default_subcommand(argv: list[str]) -> list[str]:
    """``argv`` with ``edit`` put in front of the first argument that is neither ``--debug`` nor a subcommand, when
    that argument is an option: ``editsteer --seed 3`` is ``editsteer edit --seed 3``, ``editsteer`` alone is
    ``editsteer edit``. A bare word that is not a subcommand stays, so a typo gets argparse's "invalid choice"."""
    first = next((i for i, a in enumerate(argv) if a != "--debug"), None)
    if first is None:
        return [*argv, DEFAULT_SUBCOMMAND]
    a = argv[first]
    if a.startswith("-") and a not in ("-h", "--help", "--version"):
        return [*argv[:first], DEFAULT_SUBCOMMAND, *argv[first:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("EDITSTEER_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = with_default_subcommand(argv)
    args = parser.parse_args(argv)
    args._command = "editsteer " + shlex.join(argv)  # what reproduces this run, for the reports that record it
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except EditSteerError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so plainly, keep the traceback for --debug
        if debug:
            raise
        print(f"internal error: {type(e).__name__}: {e}\n(rerun with --debug for the traceback, and please report it)",
              file=sys.stderr)
        return 1

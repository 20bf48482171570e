"""Names of the benchmarked methods -> where they are implemented (imported when used)."""

from __future__ import annotations

import importlib

from ..errors import EditSteerConfigError

METHODS: dict[str, str] = {
    "identity": "diffusers_ext.bench.baselines:IdentityMethod",
    "identity-mt": "diffusers_ext.bench.baselines:IdentitySequenceMethod",
    "base": "diffusers_ext.toy.bench:BaseEditorMethod",
    "critic": "diffusers_ext.critic.bench:CriticMethod",
    "verilatent": "diffusers_ext.verilatent.bench:VeriLatentMethod",
    "bon": "diffusers_ext.verilatent.bench:BestOfNMethod",
    "mln": "diffusers_ext.mln.bench:MLNMethod",
    "regen": "diffusers_ext.mln.bench:RegenMethod",
    "anchoredit": "diffusers_ext.anchoredit.bench:AnchorEditMethod",
    "refeed": "diffusers_ext.anchoredit.bench:RefeedMethod",
}


def load_method(name: str):
    """The BenchMethod class for ``name``; a clear error when unknown or not available in this build."""
    if name not in METHODS:
        raise EditSteerConfigError(f"unknown bench method '{name}'; known: {', '.join(METHODS)}")
    mod, _, cls = METHODS[name].partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ModuleNotFoundError as e:
        if e.name and mod.startswith(e.name):
            raise EditSteerConfigError(f"bench method '{name}' is not available in this build ({mod} is missing)") from None
        raise

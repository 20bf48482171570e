"""Where the flat custom_pipeline shim lives."""

from pathlib import Path


def shim_path() -> str:
    """The folder holding MLN's ``pipeline.py`` shim (pass it as ``custom_pipeline=``)."""
    return str(Path(__file__).resolve().parents[1] / "shims" / "mln")

"""Where the flat custom_pipeline shim lives."""

from pathlib import Path


def shim_path() -> str:
    """MLN's shim file, ``shims/mln/editsteer_mln.py`` (pass it as ``custom_pipeline=``).

    diffusers imports a local custom pipeline as ``diffusers_modules.local.<file name>``: a unique file name keeps it
    apart from other shims loaded in the same process (two folders' ``pipeline.py`` would collide). The folder also
    holds the same code as ``pipeline.py`` for diffusers' folder form.
    """
    return str(Path(__file__).resolve().parents[1] / "shims" / "mln" / "editsteer_mln.py")

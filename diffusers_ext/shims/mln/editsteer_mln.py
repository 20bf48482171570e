"""custom_pipeline shim for Masked Logit Nudging: one DiffusionPipeline subclass, imported from the installed pack.

    from diffusers import DiffusionPipeline
    from diffusers_ext.mln import shim_path
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=shim_path(), trust_remote_code=True)
"""

from diffusers_ext.mln.pipeline import MLNPipeline  # noqa: F401

"""Flat ``pipeline.py`` files for ``DiffusionPipeline.from_pretrained(..., custom_pipeline=<folder>)``."""

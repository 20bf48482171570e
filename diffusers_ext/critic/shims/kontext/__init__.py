"""Shim folder for ``custom_pipeline=``: FLUX.1 Kontext with an Inline Critic."""

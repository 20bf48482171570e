"""Shim folder for ``custom_pipeline=``: Qwen-Image-Edit with an Inline Critic."""

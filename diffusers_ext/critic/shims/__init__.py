"""``custom_pipeline`` shim folders (each holds a flat ``pipeline.py``); see :func:`diffusers_ext.critic.shim_path`."""

"""``custom_pipeline`` shims: ``<kind>/editsteer_critic_<kind>.py`` (what :func:`diffusers_ext.critic.shim_path`
returns; a unique file name, so diffusers caches it as its own module beside other packs' shims) and the same code as
``<kind>/pipeline.py`` for diffusers' folder form."""

"""diffusers ``custom_pipeline`` shim: Qwen-Image-Edit with an EditSteer Inline Critic.

diffusers copies this file into its modules cache and picks the one ``DiffusionPipeline`` subclass it names, so it
stays flat and only imports the installed pack (``pip install editsteer``)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("Qwen/Qwen-Image-Edit", custom_pipeline="<this folder>",
                                             trust_remote_code=True, critic="org/my-qwen-critic")
"""

from diffusers_ext.critic.pipelines import InlineCriticQwenEditPipeline  # noqa: F401  (the pipeline class)

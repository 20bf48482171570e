"""diffusers ``custom_pipeline`` shim: FLUX.1 Kontext with an EditSteer Inline Critic.

diffusers copies this file into its modules cache and picks the one ``DiffusionPipeline`` subclass it names, so it
stays flat and only imports the installed pack (``pip install editsteer``)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev", custom_pipeline="<this folder>",
                                             trust_remote_code=True, critic="org/my-kontext-critic")
"""

from diffusers_ext.critic.pipelines import InlineCriticKontextPipeline  # noqa: F401  (the pipeline class)

"""ComfyUI nodes of VeriLatent: search over starting noises, judged in latent space after a few steps.

``EditSteer VeriLatent Sampler`` wraps any SAMPLER for ``SamplerCustomAdvanced`` (so it composes with any GUIDER,
NOISE, edit model and the Inline Critic); ``EditSteer VeriLatent Report`` shows what the search did (NFE spent,
chosen seed, the candidates' edit maps); ``EditSteer VeriLatent Edit`` is the one-node version, like ``KSampler``.
Candidate ``j`` starts from the noise that ``RandomNoise(seed + j)`` gives, so the chosen seed reproduces the result
with a plain sampler.
"""

from __future__ import annotations

import json
import math

import torch

from comfy_api.latest import io

CATEGORY = "EditSteer/VeriLatent"
SearchLogType = io.Custom("EDITSTEER_VERILATENT_LOG")


def search_inputs() -> list:
    return [
        io.Int.Input("candidates", default=4, min=1, max=256,
                     tooltip="Starting noises tried in the first round (candidate j uses noise seed + j). 1 with "
                             "budget 1 is the plain sampler."),
        io.Int.Input("budget", default=8, min=1, max=1024,
                     tooltip="The most candidates in total: while the edit looks hard, rounds of round_size more "
                             "are added up to this. Equal to candidates: a fixed budget of one round."),
        io.Int.Input("early_step", default=2, min=1, max=1000,
                     tooltip="Steps every candidate runs before it is judged (k); must be below the step count."),
        io.Int.Input("top_m", default=1, min=1, max=64,
                     tooltip="Best candidates continued to the last step; the output batch holds them, best first."),
        io.Int.Input("round_size", default=4, min=1, max=256,
                     tooltip="Candidates added by each further round of an adaptive search."),
        io.Latent.Input("source_latent", optional=True,
                        tooltip="The source image's latent (VAEEncode of the image being edited). Default: the "
                                "reference latent of the positive conditioning (ReferenceLatent / "
                                "TextEncodeQwenImageEdit)."),
        io.Mask.Input("mask", optional=True,
                      tooltip="Optional region the edit should change; replaces the candidates' consensus region."),
        io.Int.Input("rollout_batch", default=ROLLOUT_BATCH_DEFAULT, min=0, max=256, optional=True,
                     tooltip="The most candidates denoised in one model call (early steps and finalists). ComfyUI "
                             "reserves memory for the batch it was given (one image), so 1 (default) is safe "
                             "with large models; raise it to run candidates in parallel when memory allows (0: a "
                             "whole round at once). The results do not change."),
    ]


#: ``rollout_batch`` when the input is left out (ComfyUI passes no value for an absent optional input)
ROLLOUT_BATCH_DEFAULT = 1


def make_config(candidates: int, budget: int, early_step: int, top_m: int, round_size: int,
                rollout_batch: int = ROLLOUT_BATCH_DEFAULT):
    """The :class:`VeriLatentConfig` of the nodes' inputs (errors name the node inputs)."""
    from diffusers_ext.errors import EditSteerConfigError
    from diffusers_ext.verilatent import VeriLatentConfig

    if rollout_batch < 0:
        raise EditSteerConfigError(f"rollout_batch must be >= 0 (0: a whole round at once), got {rollout_batch}")
    if candidates < 1 or budget < 1:
        raise EditSteerConfigError(f"candidates and budget must be at least 1 (got candidates={candidates}, "
                                   f"budget={budget}): at least one starting noise is needed")
    if budget < candidates:
        raise EditSteerConfigError(f"budget ({budget}) is the most candidates in total and cannot be below the "
                                   f"first round's candidates ({candidates}); raise budget or lower candidates")
    if top_m > candidates:
        raise EditSteerConfigError(f"top_m ({top_m}) cannot exceed candidates ({candidates})")
    # a SAMPLER sees latents only (no attention maps): the latent editing map, as the core's "mix" falls back to
    return VeriLatentConfig(n0=candidates, n_max=budget if budget > candidates else None, round_size=round_size,
                            top_m=top_m, k=early_step, activation="latent", rollout_batch=rollout_batch or None)


class EditSteerVeriLatentSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerVeriLatentSampler",
            display_name="VeriLatent Sampler (EditSteer)",
            category=CATEGORY,
            description="A SAMPLER for SamplerCustomAdvanced that tries several starting noises, judges them in "
                        "latent space after a few steps (does the edit land where the candidates agree it should, "
                        "and leave the rest alone?), spends more candidates only on hard edits, and finishes the "
                        "best. Use a single-step sampler (euler) for results identical to a plain run of the chosen "
                        "seed.",
            inputs=[io.Sampler.Input("sampler", tooltip="The sampler every candidate runs (e.g. KSamplerSelect "
                                                        "euler).")] + search_inputs(),
            outputs=[io.Sampler.Output(display_name="sampler"),
                     SearchLogType.Output(display_name="search_log")],
        )

    @classmethod
    def execute(cls, sampler, candidates, budget, early_step, top_m, round_size, source_latent=None,
                mask=None, rollout_batch=ROLLOUT_BATCH_DEFAULT) -> io.NodeOutput:
        from .search_sampler import SearchLog, VeriLatentSampler

        cfg = make_config(candidates, budget, early_step, top_m, round_size, rollout_batch)
        log = SearchLog()
        return io.NodeOutput(VeriLatentSampler(sampler, cfg, source=source_latent, mask=mask, log=log), log)


def maps_picture(report, scale: int = 8) -> torch.Tensor:
    """The candidates' normalised edit maps and the expected region side by side, as an IMAGE ``(1, H, W, 3)``."""
    maps = report.maps() if report is not None else {}
    if not maps:
        return torch.zeros(1, scale, scale, 3)
    tiles = list(maps["normalised"]) + ([maps["region"]] if "region" in maps else [])
    h, w = tiles[0].shape
    row = torch.full((h, len(tiles) * (w + 1) - 1), 0.25)
    for i, t in enumerate(tiles):
        row[:, i * (w + 1):i * (w + 1) + w] = t.float().clamp(0, 1)
    row = row.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return row[None, ..., None].expand(1, *row.shape, 3).contiguous()


def report_outputs(log) -> tuple[int, int, str, str]:
    r = log.report
    if r is None:
        from diffusers_ext.errors import EditSteerConfigError

        raise EditSteerConfigError("the VeriLatent sampler has not run yet: connect the LATENT its "
                                   "SamplerCustomAdvanced produced to this node")
    seeds = r.chosen_seeds
    return int(r.nfe), int(seeds[0] if seeds else -1), json.dumps(r.to_json(), indent=1), log.summary()


class EditSteerVeriLatentReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditSteerVeriLatentReport",
            display_name="VeriLatent Report (EditSteer)",
            category=CATEGORY,
            description="What the latest VeriLatent search did: NFE spent, the chosen seed, rounds and scores "
                        "(JSON), and the candidates' normalised edit maps next to the expected region.",
            inputs=[
                SearchLogType.Input("search_log", tooltip="The search_log output of VeriLatent Sampler."),
                io.Latent.Input("latent", tooltip="The LATENT the search produced (SamplerCustomAdvanced output): "
                                                  "makes this node run after sampling."),
            ],
            outputs=[io.Int.Output(display_name="nfe"), io.Int.Output(display_name="chosen_seed"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="edit_maps")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, search_log, latent) -> io.NodeOutput:
        from comfy_api.latest import ui

        nfe, seed, report, summary = report_outputs(search_log)
        return io.NodeOutput(nfe, seed, report, maps_picture(search_log.report), ui=ui.PreviewText(summary))


class EditSteerVeriLatentEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="EditSteerVeriLatentEdit",
            display_name="VeriLatent Edit (EditSteer)",
            category=CATEGORY,
            description="KSampler with a VeriLatent search over starting noises: tries candidates, judges them "
                        "after a few steps, finishes the best. Reports the NFE spent and the chosen seed (a plain "
                        "KSampler with that seed gives the same image).",
            inputs=[
                io.Model.Input("model", tooltip="Any edit MODEL (Kontext, Qwen-Image-Edit, the toy editor, with or "
                                                "without the Inline Critic)."),
                io.Conditioning.Input("positive", tooltip="The edit's conditioning, carrying the source image's "
                                                          "reference latent."),
                io.Latent.Input("latent_image", tooltip="The latent to sample, at the source image's size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Candidate j starts from the noise of seed + j."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps of a full run."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (1: no negative pass)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="The sampler every candidate runs (euler: exact resume after judging)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple",
                               tooltip="The noise schedule."),
            ] + search_inputs() + [
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning; required when cfg is not 1 (as in KSampler)."),
            ],
            outputs=[io.Latent.Output(display_name="latent"), io.Int.Output(display_name="nfe"),
                     io.Int.Output(display_name="chosen_seed"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, cfg, sampler_name, scheduler, candidates, budget,
                early_step, top_m, round_size, source_latent=None, mask=None, negative=None,
                rollout_batch=ROLLOUT_BATCH_DEFAULT) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview
        from comfy_api.latest import ui

        from diffusers_ext.errors import EditSteerConfigError

        from .search_sampler import SearchLog, VeriLatentSampler

        if negative is None and not math.isclose(float(cfg), 1.0):
            # CFGGuider would run with no unconditional prediction and return cond * cfg: a broken image, no error
            raise EditSteerConfigError(
                f"cfg is {cfg} but no negative conditioning is connected: classifier-free guidance needs one. "
                "Connect a negative (e.g. CLIPTextEncode with an empty prompt, or ConditioningZeroOut), or set cfg "
                "to 1 (guidance-distilled models such as FLUX.1 Kontext [dev] use cfg 1 and a FluxGuidance node)")
        config = make_config(candidates, budget, early_step, top_m, round_size, rollout_batch)
        log = SearchLog()
        sampler = VeriLatentSampler(comfy.samplers.sampler_object(sampler_name), config, source=source_latent,
                                    mask=mask, log=log)
        latent = dict(latent_image)
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        guider = comfy.samplers.CFGGuider(model)
        if negative is None:
            guider.inner_set_conds({"positive": positive})
        else:
            guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        callback = latent_preview.prepare_callback(model, steps)
        out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        latent.pop("noise_mask", None)
        latent.pop("batch_index", None)
        nfe, chosen, report, summary = report_outputs(log)
        return io.NodeOutput(latent, nfe, chosen, report, ui=ui.PreviewText(summary))


NODES = [EditSteerVeriLatentSampler, EditSteerVeriLatentReport, EditSteerVeriLatentEdit]

"""Golden kind `pipeline`: a whole `WanI2VLongPipeline.__call__` through our streaming sampler.

The tiny modules are built from the case's `config` and loaded from its `param/<module>/` tensors
through our loaders (release key layouts); the request comes from `call.common` and each run of
`call.runs`; the noise is the case's `input/noise_latents`, passed explicitly. Checked:

- the window plan (windows, overlaps, blend weights) and each run's timesteps and sigmas;
- the shared conditioning (`y`, CLIP tokens) and every window's expression tokens (`debug/`);
- latents after every step and at the end, for both latent policies: float32 (`BlendCast.NONE`,
  golden `*_no_bf16_cast`, tight tolerance) and the reference's bf16 round trip of blended windows
  (`BlendCast.BF16_ROUNDTRIP`, golden without suffix, its looser tolerance);
- the per-pass transformer outputs of each (step, window), where recorded;
- the decoded video of the STORED final latents through our decode stream, first frame dropped.

Tolerances come from the case's `tolerance` entries, whose keys are glob patterns (with `(+ ...)`
alternatives); an output takes the most specific matching entry.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

import numpy as np
import torch

from flashportrait.golden import Comparison, GoldenCase, compare, compare_exact, failure
from flashportrait.models.clip import CLIPVisionConfig, XLMRobertaTowerSpec, load_clip_vision
from flashportrait.models.portrait_encoder import (
    PortraitEncoderConfig,
    ResamplerConfig,
    load_portrait_encoder,
)
from flashportrait.models.transformer import DiTConfig, build_meta
from flashportrait.models.wan_vae import WanVaeConfig, load_wan_vae
from flashportrait.sampling.decode_stream import VideoDecodeStream
from flashportrait.sampling.params import GenerationParams
from flashportrait.sampling.sampler import GenerationRequest, PreparedRequest, Sampler, WindowDenoiser
from flashportrait.sampling.wavefront import BlendCast, FinalLatents, StepLatents
from flashportrait.weights import load_into

# The reference's scheduler names in `call.runs.*.scheduler` -> ours.
_SCHEDULERS = {"step_distill": "step_distill", "flow_match_euler": "euler"}
# Output suffix of each latent policy.
_POLICIES = ((BlendCast.NONE, "_no_bf16_cast"), (BlendCast.BF16_ROUNDTRIP, ""))


def run(case: GoldenCase) -> list[Comparison]:
    results: list[Comparison] = []
    sampler = _build_sampler(case, results)
    conditioning = None  # the same image and window size in every run: encoded once
    for run_name, spec in case.call["runs"].items():
        kind = _SCHEDULERS.get(spec["scheduler"])
        if kind is None:
            results.append(failure(f"{run_name}.scheduler", f"unknown scheduler {spec['scheduler']!r}"))
            continue
        request = _request(case, spec, kind)
        prepared = sampler.prepare(request, conditioning)
        conditioning = prepared.conditioning
        results += _check_plan_and_schedule(case, run_name, spec, prepared)
        if case.has(f"debug/{run_name}/y"):
            results += _check_conditioning(case, run_name, sampler, prepared)
        for policy, suffix in _POLICIES:
            checks, bounds = _check_latents(case, run_name, sampler, prepared, policy, suffix)
            results += checks
            if policy is BlendCast.NONE and case.has(f"output/{run_name}/decoded_video_drop_first"):
                results.append(_check_decode(case, sampler, run_name, bounds))
    return results


# -- set-up ------------------------------------------------------------------------------------------


def _build_sampler(case: GoldenCase, results: list[Comparison]) -> Sampler:
    config = case.config
    dit_config = DiTConfig.from_reference(config["transformer"])
    dit = build_meta(dit_config)
    load_into(dit, case.group("param/transformer/"), strict=True, dtype=torch.float32, device="cpu")
    vae_spec = config["vae"]
    vae_config = WanVaeConfig(base_channels=int(vae_spec["dim"]), latent_channels=int(vae_spec["z_dim"]))
    vae = load_wan_vae(case.group("param/vae/"), vae_config, dtype=torch.float32)
    clip, _ = load_clip_vision(case.group("param/clip/"), *_clip_configs(config["clip"]), dtype=torch.float32)
    resampler = config["portrait_encoder"]["resampler"]
    width = dit_config.emo_dim
    encoder_config = PortraitEncoderConfig(
        cross_attention_dim=width,
        mouth_resampler=ResamplerConfig(**resampler, num_queries=16, embedding_dim=512, output_dim=width),
        emo_resampler=ResamplerConfig(**resampler, num_queries=4, embedding_dim=30, output_dim=width),
    )
    encoder = load_portrait_encoder(case.group("param/portrait_encoder/"), encoder_config)
    results.append(compare_exact("clip_tokens", clip.config.num_tokens, int(config["clip"]["tokens"])))
    # The reference decodes with the Wan VAE in this case (no tiny VAE is configured).
    return Sampler(dit.eval(), vae, clip, encoder, vae, mode="fast", device="cpu")


def _clip_configs(spec: dict) -> tuple[CLIPVisionConfig, XLMRobertaTowerSpec]:
    o = spec["overrides"]
    layers = int(o["vision_layers"])
    applied = layers - 1  # use_31_block=True: every block but the last
    ratio = float(o["vision_mlp_ratio"])
    if not ratio.is_integer() and applied > 0:
        raise ValueError(f"vision_mlp_ratio {ratio} is not an integer and a block is applied")
    # With no block applied the ratio only sizes the skipped block's keys, which the case omits.
    vision = CLIPVisionConfig(
        image_size=int(o["image_size"]),
        patch_size=int(o["patch_size"]),
        hidden_dim=int(o["vision_dim"]),
        mlp_ratio=int(ratio) if ratio.is_integer() else 1,
        num_heads=int(o["vision_heads"]),
        num_layers=layers,
        layers_applied=applied,
        embed_dim=int(o["embed_dim"]),
        pixel_mean=tuple(spec["normalize_mean"]),
        pixel_std=tuple(spec["normalize_std"]),
    )
    text = XLMRobertaTowerSpec(
        vocab_size=int(o["vocab_size"]),
        max_text_len=int(o["max_text_len"]),
        type_size=1,
        dim=int(o["text_dim"]),
        num_layers=int(o["text_layers"]),
        out_dim=int(o["embed_dim"]),
    )
    return vision, text


def _request(case: GoldenCase, spec: dict, scheduler: str) -> GenerationRequest:
    common, config = case.call["common"], case.config
    image = case.tensor("input/image_uint8").numpy().astype(np.uint8)
    height, width, _ = image.shape
    if (height, width) != (int(common["height"]), int(common["width"])):
        raise ValueError(f"input image {width}x{height} != call size {common['width']}x{common['height']}")
    context_size = int(common["context_size"])
    if (
        int(common["sub_num_frames"]) != 4 * (context_size - 1) + 1
        or int(common["latents_num_frames"]) != context_size
    ):
        raise ValueError(
            "sub_num_frames / latents_num_frames do not describe a window of context_size frames"
        )
    params = GenerationParams(
        scheduler=scheduler,
        steps=int(spec["num_inference_steps"]),
        emo_cfg_scale=float(spec["emo_cfg_scale"]),
        text_cfg_scale=float(spec["text_cfg_scale"]),
        ip_scale=float(common["ip_scale"]),
        max_size=max(height, width),  # the image is already at its size: resizing must keep it
        context_size=context_size,
        context_overlap=int(common["context_overlap"]),
        shift=float(common["shift"]),
    )
    features = case.tensor("input/head_emo_feat_all")[0]
    if features.shape[0] != int(config.get("num_frames", common["num_frames"])):
        raise ValueError(f"{features.shape[0]} feature rows for num_frames {common['num_frames']}")
    return GenerationRequest(
        image=image,
        features=features,
        prompt_embeds=case.tensor("input/prompt_embeds")[0],
        negative_prompt_embeds=case.tensor("input/negative_prompt_embeds")[0],
        params=params,
    )


# -- checks ------------------------------------------------------------------------------------------


def _check_plan_and_schedule(
    case: GoldenCase, name: str, spec: dict, prepared: PreparedRequest
) -> list[Comparison]:
    plan = prepared.plan
    out = [
        compare_exact(f"{name}.windows", plan.windows(), spec["windows_used"]),
        compare_exact(f"{name}.latent_length", plan.latent_length, int(case.config["latent_length"])),
        compare_exact(f"{name}.passes", len(prepared.passes),
                      int(spec["num_transformer_passes_per_window_step"])),
        compare_exact(f"{name}.image_size", list(prepared.conditioning.image.shape[:2]),
                      [int(case.call["common"]["height"]), int(case.call["common"]["width"])]),
    ]  # fmt: skip
    for w, pair in enumerate(spec.get("blend_pairs", []), start=1):
        out.append(compare_exact(f"{name}.overlap{w}", plan.overlaps[w], int(pair["overlap_len"])))
        out.append(
            compare_exact(
                f"{name}.blend_weights{w}",
                plan.blend_weights(w),
                torch.tensor(pair["weights_for_current"], dtype=torch.float32),
            )
        )
    scheduler = prepared.scheduler
    out.append(
        compare_exact(
            f"{name}.timesteps",
            scheduler.timesteps.float(),
            torch.tensor(spec["timesteps"], dtype=torch.float32),
        )
    )
    out.append(
        compare_exact(
            f"{name}.sigmas", scheduler.sigmas.float(), torch.tensor(spec["sigmas"], dtype=torch.float32)
        )
    )
    return out


def _check_conditioning(
    case: GoldenCase, name: str, sampler: Sampler, prepared: PreparedRequest
) -> list[Comparison]:
    cond = prepared.conditioning
    debug = f"debug/{name}"
    checks: dict[str, torch.Tensor] = {
        "y": cond.y,
        "clip_context_first64features": cond.clip[..., :64],
        "clip_context_sum_over_features": cond.clip.sum(-1),
    }
    denoiser = WindowDenoiser(sampler, prepared)
    for w in range(prepared.plan.num_windows):
        tokens = denoiser.expression_tokens(w)
        checks[f"emo_proj_window{w}_first8features"] = tokens[..., :8]
        checks[f"emo_proj_window{w}_sum_over_features"] = tokens.sum(-1)
    out = []
    for key, ours in checks.items():
        full = f"{debug}/{key}"
        if case.has(full):
            rtol, atol = _tolerance(case, full)
            out.append(compare(full, ours, case.tensor(full), rtol=rtol, atol=atol))
    for w in range(prepared.plan.num_windows):
        full = f"{debug}/emo_context_lens_window{w}"
        if case.has(full):
            out.append(compare_exact(full, denoiser.split_plan.context_lens, case.tensor(full)))
    return out


def _check_latents(
    case: GoldenCase, name: str, sampler: Sampler, prepared: PreparedRequest, policy: BlendCast, suffix: str
) -> tuple[list[Comparison], list[tuple[int, int]]]:
    """Comparisons, and the latent frame ranges of the final chunks in the order they came."""
    final_key = f"output/{name}/latents{suffix}"
    if not case.has(final_key):
        return [], []
    record = suffix == "_no_bf16_cast" and case.has(f"debug/{name}/transformer_output")
    passes: dict[tuple[int, int], torch.Tensor] = {}
    on_passes: Callable[[int, int, torch.Tensor], None] | None = None
    if record:

        def on_passes(window: int, step: int, predictions: torch.Tensor) -> None:
            passes[(step, window)] = predictions.clone()

    steps: dict[int, list[torch.Tensor]] = {}
    finals: list[torch.Tensor] = []
    bounds: list[tuple[int, int]] = []
    events = sampler.denoise(
        prepared, initial_latents=case.tensor("input/noise_latents"), blend_cast=policy, emit_steps=True,
        on_passes=on_passes,
    )  # fmt: skip
    for event in events:
        if isinstance(event, StepLatents):
            steps.setdefault(event.step, []).append(event.latents)
        elif isinstance(event, FinalLatents):
            finals.append(event.latents)
            bounds.append((event.frame_start, event.frame_stop))
    out = []
    for step, pieces in sorted(steps.items()):
        key = f"output/{name}/latents_after_step_{step}{suffix}"
        if case.has(key):
            rtol, atol = _tolerance(case, key)
            out.append(compare(key, torch.cat(pieces, dim=2), case.tensor(key), rtol=rtol, atol=atol))
    rtol, atol = _tolerance(case, final_key)
    out.append(compare(final_key, torch.cat(finals, dim=2), case.tensor(final_key), rtol=rtol, atol=atol))
    if record:
        key = f"debug/{name}/transformer_output"
        golden = case.tensor(key)  # [step, window, pass, 1, 16, C, h, w]
        num_steps, num_windows = golden.shape[:2]
        ours = torch.stack([
            torch.stack([passes[(s, w)][:, None] for w in range(num_windows)]) for s in range(num_steps)
        ])  # fmt: skip
        rtol, atol = _tolerance(case, key)
        out.append(compare(key, ours, golden, rtol=rtol, atol=atol))
    return out, bounds


def _check_decode(case: GoldenCase, sampler: Sampler, name: str, bounds: list[tuple[int, int]]) -> Comparison:
    """Decode the STORED final latents through our stream, in the chunks our sampler emitted."""
    key = f"output/{name}/decoded_video_drop_first"
    latents = case.tensor(f"output/{name}/latents")
    stream = VideoDecodeStream(sampler.decoder, chunk_latents=sampler.decode_chunk_latents)
    pieces = []
    for start, stop in bounds:
        pieces += [d.frames for d in stream.push(start, latents[:, :, start:stop])]
    pieces += [d.frames for d in stream.finish()]
    rtol, atol = _tolerance(case, key)
    return compare(key, torch.cat(pieces, dim=2), case.tensor(key), rtol=rtol, atol=atol)


# -- tolerances --------------------------------------------------------------------------------------


def _tolerance(case: GoldenCase, output: str) -> tuple[float, float]:
    """(rtol, atol) of the most specific `tolerance` entry whose pattern matches `output`."""
    best: tuple[int, float, float] | None = None
    for key, entry in case.tolerance.items():
        if not isinstance(entry, dict) or "atol" not in entry:
            continue
        for pattern in _patterns(key):
            if fnmatch.fnmatchcase(output, pattern) or fnmatch.fnmatchcase(output, "*/" + pattern):
                specificity = len(pattern.replace("*", ""))
                if best is None or specificity > best[0]:
                    best = (specificity, float(entry.get("rtol", 0.0)), float(entry["atol"]))
    if best is None:
        return case.rtol_atol()
    return best[1], best[2]


def _patterns(key: str) -> list[str]:
    """`"output/*/latents (+ latents_after_step_*)"` -> ["output/*/latents", "latents_after_step_*"]."""
    base, _, rest = key.partition(" (")
    extra = re.findall(r"\+\s*([^\s,)]+)", rest)
    return [base.strip(), *extra]

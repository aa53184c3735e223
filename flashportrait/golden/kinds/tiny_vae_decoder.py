"""Golden kind `tiny_vae_decoder`: the TAEHV decoder (models/tiny_vae.py), built from `config.neutral`.

Compares the fast-path output (normalised latents in, `need_scaled` false), the `need_scaled` true
variant, and the raw untrimmed last-conv output; the fast-path output is also decoded one latent frame
per chunk to show the stream reproduces it.
"""

from __future__ import annotations

import dataclasses

import torch

from flashportrait.golden import Comparison, GoldenCase, compare
from flashportrait.golden.kinds.vae_common import config_and_stated_checks
from flashportrait.models.decoding import decode_all
from flashportrait.models.tiny_vae import TinyVaeConfig, load_tiny_vae

# Derived quantities the case states for the reader; checked, not configured.
_DERIVED = ("frames_to_trim", "spatial_factor", "temporal_factor")


def run(case: GoldenCase) -> list[Comparison]:
    config, results = config_and_stated_checks(case, TinyVaeConfig, _DERIVED)

    latents = case.tensor("input/latents")

    def check(name: str, ours: torch.Tensor, golden_name: str | None = None) -> None:
        golden_name = golden_name or name
        rtol, atol = case.rtol_atol(golden_name)
        results.append(compare(name, ours, case.tensor(f"output/{golden_name}"), rtol=rtol, atol=atol))

    for need_scaled in (False, True):
        name = f"video_need_scaled_{str(need_scaled).lower()}"
        if not case.has(f"output/{name}"):
            continue
        decoder = load_tiny_vae(
            case.params(), dataclasses.replace(config, need_scaled=need_scaled), dtype=torch.float32
        )
        check(name, decode_all(decoder, latents))
        if not need_scaled:
            check(f"{name}_one_latent_frame_per_chunk", decode_all(decoder, latents, chunk=1), name)
            if case.has("output/decoder_raw_parallel_untrimmed"):
                raw = decoder.decode_raw(latents, decoder.begin(latents.shape[0]))
                b, rgb, t, h, w = raw.shape
                # The reference's layout: frames flattened batch-major, [B*T', 3, H, W].
                flat = raw.permute(0, 2, 1, 3, 4).reshape(b * t, rgb, h, w)
                check("decoder_raw_parallel_untrimmed", flat)
    return results

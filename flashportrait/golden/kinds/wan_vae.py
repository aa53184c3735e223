"""Golden kind `wan_vae`: the Wan 2.1 causal VAE (models/wan_vae.py), built from `config.neutral`.

Encode compares the raw moments and the normalised posterior mode; decode runs the golden latents
through the streaming decoder (whole video in one chunk, then one latent frame per chunk as the
reference loops) and compares the de-normalised latents, the unclamped and the clamped video.
"""

from __future__ import annotations

import torch

from flashportrait.golden import Comparison, GoldenCase, compare
from flashportrait.golden.kinds.vae_common import config_and_stated_checks
from flashportrait.models.decoding import decode_all
from flashportrait.models.wan_vae import WanVaeConfig, load_wan_vae

# Derived quantities the case states for the reader; checked, not configured.
_DERIVED = ("spatial_factor", "temporal_factor")

# The logvar clamp of the reference's DiagonalGaussianDistribution.
_LOGVAR_RANGE = (-30.0, 20.0)


def run(case: GoldenCase) -> list[Comparison]:
    config, results = config_and_stated_checks(case, WanVaeConfig, _DERIVED)

    vae = load_wan_vae(case.params(), config, dtype=torch.float32, device="cpu")

    def check(name: str, ours: torch.Tensor) -> None:
        rtol, atol = case.rtol_atol(name)
        results.append(compare(name, ours, case.tensor(f"output/{name}"), rtol=rtol, atol=atol))

    if case.has("input/video"):
        mu, logvar = vae.encode_moments(case.tensor("input/video"))
        check("enc_raw_mu", mu)
        check("enc_raw_logvar", logvar)
        check("enc_latent_mode", vae.normalize(mu))
        check("enc_latent_logvar_clamped", logvar.clamp(*_LOGVAR_RANGE))

    if case.has("input/latents"):
        latents = case.tensor("input/latents")
        z = vae.denormalize(latents)
        check("dec_z_denorm", z)
        state = vae.begin(latents.shape[0])
        check("dec_video_unclamped", vae.decode_raw(z, state).float())
        video = decode_all(vae, latents)
        check("dec_video", video)
        per_frame = decode_all(vae, latents, chunk=1)
        rtol, atol = case.rtol_atol("dec_video")
        results.append(
            compare(
                "dec_video_one_latent_frame_per_chunk",
                per_frame,
                case.tensor("output/dec_video"),
                rtol=rtol,
                atol=atol,
            )
        )
    return results

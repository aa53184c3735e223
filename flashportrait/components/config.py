"""`DeploymentConfig`: the architecture of every model of one FlashPortrait deployment.

Architecture always comes from this explicit object, never from file names or tensor shapes:
- the real release uses the `release()` preset (FlashPortrait on Wan2.1-I2V-14B-720P), and the Wan
  folder's `config.json` must agree with its DiT;
- any other weights folder (the demo weights, a custom size) states its sizes in
  `flashportrait_config.json` at the weights root, the JSON form of this object (`to_json`).

The components must fit together (the DiT's text, CLIP and expression widths, the VAE latent
channels, the motion-feature split of the portrait encoder); `__post_init__` checks every such
interface so a wrong file is refused before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from flashportrait.config import ConfigError, from_mapping, read_json, to_mapping
from flashportrait.models.clip import VIT_H14, XLM_ROBERTA_LARGE, CLIPVisionConfig, XLMRobertaTowerSpec
from flashportrait.models.motion_encoder import PD_FGC, MotionEncoderConfig
from flashportrait.models.portrait_encoder import PortraitEncoderConfig, ResamplerConfig
from flashportrait.models.t5 import UMT5_XXL, T5EncoderConfig
from flashportrait.models.tiny_vae import TinyVaeConfig
from flashportrait.models.transformer import DiTConfig
from flashportrait.models.wan_vae import WanVaeConfig

# Keys of the real Wan2.1-I2V-14B-720P `config.json` (besides diffusers' `_class_name`/`_diffusers_version`).
_WAN_CONFIG_KEYS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers",
                    "out_dim", "text_len")  # fmt: skip


@dataclass(frozen=True)
class DeploymentConfig:
    """Sizes of every model a deployment loads. `name` only labels logs and files."""

    dit: DiTConfig
    wan_vae: WanVaeConfig
    tiny_vae: TinyVaeConfig
    text_encoder: T5EncoderConfig
    clip: CLIPVisionConfig
    clip_text: XLMRobertaTowerSpec  # the CLIP file's unused text tower (its key shapes only)
    portrait_encoder: PortraitEncoderConfig
    motion_encoder: MotionEncoderConfig
    name: str = "custom"

    def __post_init__(self) -> None:
        dit, vae, tiny, pe, me = (
            self.dit,
            self.wan_vae,
            self.tiny_vae,
            self.portrait_encoder,
            self.motion_encoder,
        )
        # The I2V condition y: one mask channel per frame of a latent frame's temporal group, then the
        # reference image's latents; concatenated to the noisy latents on channels.
        mask_channels = vae.temporal_factor
        checks = [
            ("dit.text_dim", dit.text_dim, "text_encoder.hidden_dim", self.text_encoder.hidden_dim),
            ("dit.clip_dim", dit.clip_dim, "clip.hidden_dim", self.clip.hidden_dim),
            ("dit.clip_tokens", dit.clip_tokens, "clip tokens (1 + (image_size/patch_size)^2)",
             self.clip.num_tokens),
            ("dit.emo_dim", dit.emo_dim, "portrait_encoder.cross_attention_dim", pe.cross_attention_dim),
            ("dit.out_dim", dit.out_dim, "wan_vae.latent_channels", vae.latent_channels),
            ("dit.in_dim", dit.in_dim, "2 * latent_channels + temporal factor (I2V mask + condition)",
             2 * vae.latent_channels + mask_channels),
            ("tiny_vae.latent_channels", tiny.latent_channels, "wan_vae.latent_channels",
             vae.latent_channels),
            ("tiny_vae temporal factor", tiny.temporal_factor, "wan_vae temporal factor",
             vae.temporal_factor),
            ("tiny_vae spatial factor", tiny.spatial_factor, "wan_vae spatial factor", vae.spatial_factor),
            ("portrait_encoder.feature_split", tuple(pe.feature_split),
             "motion encoder (pose_dim, eye_dim, emotion_dim, feature_dim)",
             (me.pose_dim, me.eye_dim, me.emotion_dim, me.feature_dim)),
            ("clip_text.out_dim", self.clip_text.out_dim, "clip.embed_dim", self.clip.embed_dim),
        ]  # fmt: skip
        bad = [f"{a} = {va!r} but {b} = {vb!r}" for a, va, b, vb in checks if va != vb]
        if bad:
            raise ConfigError(
                f"DeploymentConfig {self.name!r}: components do not fit together: " + "; ".join(bad)
            )

    @classmethod
    def release(cls) -> DeploymentConfig:
        """FrancisRing/FlashPortrait on Wan-AI/Wan2.1-I2V-14B-720P (the reference's `fast_infer.py`)."""
        return cls(
            dit=DiTConfig.wan_i2v_14b(),
            wan_vae=WanVaeConfig.wan21(),
            tiny_vae=TinyVaeConfig.taew2_1(),
            text_encoder=UMT5_XXL,
            clip=VIT_H14,
            clip_text=XLM_ROBERTA_LARGE,
            portrait_encoder=PortraitEncoderConfig(),
            motion_encoder=PD_FGC,
            name="flashportrait-wan2.1-i2v-14b-720p",
        )

    @classmethod
    def tiny(cls) -> DeploymentConfig:
        """The demo weights' sizes (`export/demo_weights.py`): the release's structure (every module,
        key name and interface) at widths that run a whole generation on a laptop CPU in seconds.

        Kept at their real values because they are interfaces fixed by the data, not widths: the
        DiT's 16 latent / 36 input channels, text_len 512, 257 CLIP tokens, 24 expression tokens per
        frame, the 554-value motion feature, and the whole PD-FGC motion encoder (9M parameters).
        """
        width = 64  # DiT, CLIP and expression-token width
        resampler = ResamplerConfig(dim=32, depth=1, dim_head=16, heads=2, ff_mult=2, output_dim=width)
        return cls(
            dit=DiTConfig(
                dim=width,
                ffn_dim=128,
                num_heads=4,
                num_layers=2,
                in_dim=36,
                out_dim=16,
                freq_dim=256,
                text_len=512,
                text_dim=32,
                clip_dim=width,
                emo_dim=width,
            ),
            wan_vae=WanVaeConfig(base_channels=8),
            tiny_vae=TinyVaeConfig(decoder_widths=(32, 16, 16, 16), encoder_width=16),
            text_encoder=T5EncoderConfig(
                vocab_size=512, hidden_dim=32, attn_dim=32, ffn_dim=64, num_heads=4, num_layers=2
            ),
            clip=CLIPVisionConfig(
                image_size=32,
                patch_size=2,
                hidden_dim=width,
                mlp_ratio=2,
                num_heads=4,
                num_layers=2,
                layers_applied=1,
                embed_dim=16,
            ),
            clip_text=XLMRobertaTowerSpec(
                vocab_size=64, max_text_len=8, type_size=1, dim=16, num_layers=1, out_dim=16
            ),
            portrait_encoder=PortraitEncoderConfig(
                cross_attention_dim=width,
                mouth_resampler=resampler,
                emo_resampler=replace(resampler, num_queries=4, embedding_dim=30),
            ),
            motion_encoder=PD_FGC,
            name="demo-tiny",
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "DeploymentConfig") -> DeploymentConfig:
        """From the JSON form; unknown or missing keys (at any level) are errors."""
        return from_mapping(cls, data, where=where)

    @classmethod
    def from_json_file(cls, path: str | Path) -> DeploymentConfig:
        return cls.from_mapping(read_json(path, "deployment config"), where=str(path))

    def to_json(self) -> str:
        return json.dumps(to_mapping(self), indent=2, sort_keys=True) + "\n"


def wan_config_json(dit: DiTConfig) -> dict[str, Any]:
    """The Wan release's `config.json` for `dit`: the keys the real file has, plus every field that
    differs from the `DiTConfig` defaults (so the file alone describes the DiT, as the real one does)."""
    data: dict[str, Any] = {"_class_name": "WanModel", "_diffusers_version": "0.30.0"}
    values = to_mapping(dit)
    for f in fields(DiTConfig):
        default = MISSING if f.default is MISSING else to_mapping(f.default)
        if f.name in _WAN_CONFIG_KEYS or values[f.name] != default:
            data[f.name] = values[f.name]
    return data


def check_wan_config(path: str | Path, dit: DiTConfig) -> None:
    """The Wan folder's `config.json` must agree with the deployment's DiT on every key it states.

    Keys starting with `_` (diffusers bookkeeping) are skipped; the diffusers aliases
    `in_channels`/`hidden_size` are read as `in_dim`/`dim`; a key that is no DiT field is an error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"Wan DiT config {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Wan DiT config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Wan DiT config {path} is not a JSON object")
    stated = DiTConfig.from_reference(data, where=str(path))  # unknown keys and bad values fail here
    ours, theirs = to_mapping(dit), to_mapping(stated)
    aliases = {"in_channels": "in_dim", "hidden_size": "dim"}
    keys = sorted({aliases.get(k, k) for k in data if not k.startswith("_")})
    bad = [f"{k}: config.json {theirs[k]!r}, deployment {ours[k]!r}" for k in keys if theirs[k] != ours[k]]
    if bad:
        raise ConfigError(
            f"{path} disagrees with the deployment's DiT architecture ({'; '.join(bad)}); "
            "the weights folder belongs to another model size, or flashportrait_config.json is wrong"
        )


__all__ = ["DeploymentConfig", "check_wan_config", "wan_config_json"]

"""The Wan2.1 image-to-video diffusion transformer with FlashPortrait's expression cross-attention.

`WanDiT` has exactly the parameter names and shapes of the release checkpoints
(`golden/manifests/transformer_i2v_14b.json`); the golden case `transformer_i2v_tiny` is the
numerical contract. Blocks and the precision policy are in `dit_blocks.py`, RoPE in `rope.py`,
checkpoint loading in `dit_loading.py`.

Speed (issue 7, BENCHMARKS.md): on CUDA the forward takes the fused fast path of `dit_blocks.py`
(`fast_path` None = automatic, True/False to force it); on the CPU it keeps the reference arithmetic,
so the goldens see exactly what they were produced with. On the fast path, inputs that are the same
row for every sample (batch 1 or a stride-0 `expand`, as the sampler passes the guidance passes'
latents, condition, timestep, CLIP features, expression tokens and, if it shares one, the prompt) are
computed once: the time embedding, the image/text keys and values, and the stream up to where the
samples differ (the first block's cross-attention, through ip_scale). Nothing in a forward waits
for the device: values are validated only where they live on the host. `convert_to_fp8` quantises
block linears to e4m3 once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashportrait.config import ConfigError, from_mapping, read_json
from flashportrait.kernels import triton_runs_on
from flashportrait.models.dit_blocks import (
    CLIP_TOKENS,
    CastLinear,
    DiTBlock,
    Fp32Linear,
    Head,
    ImageProjection,
)
from flashportrait.models.fp8_linear import DEFAULT_FP8_LAYERS, DIT_FP8_LAYER_SETS, convert_linears_to_fp8
from flashportrait.models.rope import RopeCache
from flashportrait.weights import module_tensor_shapes

# `config.json` keys of the VideoX-Fun/diffusers lineage that name the same thing as ours.
_ALIASES = {"in_channels": "in_dim", "hidden_size": "dim"}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the DiT. Field names are the reference constructor's (and the Wan release
    `config.json`'s); the defaults are the reference class defaults that `config.json` omits."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    freq_dim: int
    text_len: int
    text_dim: int = 4096
    # tuple[int, ...] rather than fixed-length tuples: config.from_mapping's fixed-length branch
    # swaps value and type (reported to the lead); lengths are checked in __post_init__.
    patch_size: tuple[int, ...] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    model_type: str = "i2v"
    window_size: tuple[int, ...] = (-1, -1)
    clip_tokens: int = CLIP_TOKENS
    clip_dim: int = 1280
    emo_dim: int = 2048
    rope_theta: float = 10000.0
    img_emb_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.model_type != "i2v":
            raise ValueError(f"model_type {self.model_type!r} is not supported (FlashPortrait uses 'i2v')")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError(
                f"window_size {self.window_size} is not supported (only global attention, (-1, -1))"
            )
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (frames, height, width), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and at least 6 (3-axis RoPE)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even (cos and sin halves)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def out_features(self) -> int:
        """Head width per token: prod(patch_size) * out_dim."""
        return math.prod(self.patch_size) * self.out_dim

    @classmethod
    def wan_i2v_14b(cls) -> DiTConfig:
        """Wan2.1-I2V-14B (720P and 480P share it)."""
        return cls(
            dim=5120,
            ffn_dim=13824,
            num_heads=40,
            num_layers=40,
            in_dim=36,
            out_dim=16,
            freq_dim=256,
            text_len=512,
        )

    @classmethod
    def from_reference(cls, mapping: Mapping[str, Any], *, where: str = "DiTConfig") -> DiTConfig:
        """From the reference constructor's arguments (a golden case's `config.reference_ctor`, a
        manifest's `ctor`) or a release `config.json`: keys starting with `_` (diffusers
        bookkeeping such as `_class_name`) are skipped, `in_channels`/`hidden_size` must agree with
        `in_dim`/`dim`; any other unknown key is an error."""
        data = {k: v for k, v in mapping.items() if not k.startswith("_")}
        for alias, name in _ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                if name in data and data[name] != value:
                    raise ConfigError(f"{where}: {alias}={value!r} disagrees with {name}={data[name]!r}")
                data.setdefault(name, value)
        return from_mapping(cls, data, where=where)

    @classmethod
    def from_json_file(cls, path: str | Path) -> DiTConfig:
        """A release `config.json` (or any JSON of reference constructor arguments)."""
        return cls.from_reference(read_json(path, "DiT config file"), where=str(path))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Reference time sinusoid: t [B] -> [B, dim] float32, computed in float64 as the reference does
    (cos half first, then sin; frequency i is 10000^(-i / (dim/2)))."""
    half = dim // 2
    position = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class WanDiT(nn.Module):
    """Wan2.1 I2V DiT with FlashPortrait's expression cross-attention (see module docstring)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            CastLinear(config.text_dim, dim), nn.GELU(approximate="tanh"), CastLinear(dim, dim)
        )
        # float32 whatever the weights (reference: amp.autocast(dtype=float32) around both).
        self.time_embedding = nn.Sequential(Fp32Linear(config.freq_dim, dim), nn.SiLU(), Fp32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            DiTBlock(
                dim,
                config.ffn_dim,
                config.num_heads,
                qk_norm=config.qk_norm,
                cross_attn_norm=config.cross_attn_norm,
                eps=config.eps,
                emo_dim=config.emo_dim,
                clip_tokens=config.clip_tokens,
            )
            for _ in range(config.num_layers)
        )
        self.head = Head(dim, config.out_features, config.eps)
        self.img_emb = ImageProjection(config.clip_dim, dim, config.img_emb_eps)
        self.rope = RopeCache(config.rope_theta)
        # None: the fused fast path on CUDA, the reference arithmetic elsewhere (`uses_fast_path`).
        self.fast_path: bool | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matmuls (the weights')."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor],
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        emo_proj: torch.Tensor | None = None,
        *,
        context_lens: torch.Tensor | Sequence[int] | None = None,
        ip_scale: float | torch.Tensor = 1.0,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Predict the flow for one batch of latent windows.

        x: [B, in_dim - 20, F, H, W] noisy latents (16 channels); y: [B, 20, F, H, W] I2V condition
            (4 mask channels + 16 VAE latent channels); concatenated on channels before patching.
        t: [B] (or a scalar) timesteps in 0..1000, any float dtype.
        context: text embeddings, either [B, L, text_dim] with L <= text_len plus `context_lens` [B]
            (rows at or past a sample's length are treated as zero), or a list of B tensors
            [L_i, text_dim] (the reference's form). Each is zero-padded to text_len BEFORE the text
            embedding and every row is attended, as in the reference.
        clip_fea: [B, clip_tokens, clip_dim] CLIP image features.
        emo_proj: [B, F, K, emo_dim] expression tokens per latent frame (K = 97 in FlashPortrait),
            or None (no expression branch: identical to ip_scale 0).
        ip_scale: weight of the expression branch, a float or a [B] tensor (per sample, so the
            guidance passes with and without expression run as one batch).
        seq_len: token count to pad to (>= F*H*W/prod(patch)); padded tokens are computed but masked
            as keys, and they shift the expression grouping exactly as in the reference.
        Returns [B, out_dim, F, H, W] float32.

        Differences from the reference's signature: x and y are batched tensors (one grid for the
        whole batch) instead of lists, and the expression branch groups queries by emo_proj's F,
        which must equal the latent frame count (the reference takes it as `latents_num_frames`,
        always equal to F in the pipeline); `emo_context_lens` is not taken (unused there).
        """
        cfg = self.config
        b, _, frames, _, _ = x.shape
        device, dtype = self.device, self.dtype
        fast = self.uses_fast_path(device)
        t = torch.as_tensor(t, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have one timestep per sample ({b}), got shape {list(t.shape)}")
        if y.shape[0] != b:
            raise ValueError(f"y has {y.shape[0]} samples, x has {b}")
        # Fast path: inputs that are the same row for every sample (the guidance passes' `expand`ed
        # latents, condition, timestep) are computed once; the stream stays one row until the
        # samples differ (WanDiT docstring).
        if fast:
            x, y, t = _shared_rows(x, y, t)
        tokens = self.patch_embedding(torch.cat([x, y], dim=1).to(device=device, dtype=dtype))
        rows, _, gf, gh, gw = tokens.shape
        n = gf * gh * gw
        seq_len = n if seq_len is None else int(seq_len)
        if seq_len < n:
            raise ValueError(f"seq_len {seq_len} is smaller than the {n} tokens of the input")
        # [B, dim, f, h, w] -> [B, f*h*w, dim] in (f, h, w) row-major order; zero tokens appended.
        stream = tokens.flatten(2).transpose(1, 2).float()
        if seq_len > n:
            stream = torch.cat([stream, stream.new_zeros(rows, seq_len - n, cfg.dim)], dim=1)

        # float32 island (reference: sinusoid in float64, MLP under autocast(float32)).
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))

        ctx = self._context(context, context_lens, clip_fea, b, fast)
        rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rope = self.rope.get((gf, gh, gw), seq_len, cfg.head_dim, rope_dtype, device)
        k_lens = None if seq_len == n else torch.full((b,), n, dtype=torch.int64, device=device)
        emo, scales = self._expression_inputs(emo_proj, ip_scale, b, frames)

        for block in self.blocks:
            stream = block(stream, e0, rope, k_lens, ctx, emo, scales, fast=fast)
        out = self.unpatchify(self.head(stream, e, fast=fast), (gf, gh, gw))
        if out.shape[0] != b:  # no input told the samples apart
            out = out.expand(b, *out.shape[1:]).contiguous()
        return out

    def uses_fast_path(self, device: torch.device | None = None) -> bool:
        """Whether forward takes the fused fast path: `fast_path` if set, else on CUDA when the
        Triton kernels can run there (never on the CPU, so the goldens see the reference arithmetic)."""
        device = self.device if device is None else device
        if self.fast_path is not None:
            return self.fast_path
        return device.type == "cuda" and triton_runs_on(device)

    def convert_to_fp8(self, layers: str = DEFAULT_FP8_LAYERS, *, fast_accum: bool = True) -> list[str]:
        """Quantise block linear layers to e4m3 once (FP8Linear, per-channel weight scales, per-token
        activations); run after the weights are loaded, on the device. `layers` names a selection of
        `DIT_FP8_LAYER_SETS`: by default the self-attention projections and the FFN, which keep 82%
        of the speed-up of converting every block linear ("all") at a third of its error (measured
        at full size, BENCHMARKS.md). Returns the converted layer names. Time embedding,
        patch/text/image embeddings and head always stay as they are."""
        if layers not in DIT_FP8_LAYER_SETS:
            raise ValueError(f"unknown fp8 layer set {layers!r}; choose from {sorted(DIT_FP8_LAYER_SETS)}")
        return convert_linears_to_fp8(self, DIT_FP8_LAYER_SETS[layers], fast_accum=fast_accum)

    def _context(
        self,
        context: torch.Tensor | Sequence[torch.Tensor],
        context_lens: torch.Tensor | Sequence[int] | None,
        clip_fea: torch.Tensor,
        batch: int,
        fast: bool,
    ) -> torch.Tensor:
        """Cross-attention context [B, clip_tokens + text_len, dim] in the compute dtype, image tokens
        first; fast path: [1, ...] when every sample has the same prompt and image (batch 1, a
        stride-0 batch, or a list of one tensor repeated), so their keys and values are computed once."""
        dtype = self.dtype
        if fast:
            context, context_lens, batch = _shared_context(context, context_lens, batch)
            clip_fea = clip_fea[:1] if clip_fea.shape[0] > 1 and clip_fea.stride(0) == 0 else clip_fea
            if clip_fea.shape[0] not in (1, batch):
                raise ValueError(f"clip_fea has {clip_fea.shape[0]} samples, expected {batch}")
        text = self.text_embedding(self._pad_text(context, context_lens, batch))
        image = self.img_emb(clip_fea.to(self.device))
        rows = max(text.shape[0], image.shape[0])
        image, text = (v.to(dtype).expand(rows, *v.shape[1:]) for v in (image, text))
        return torch.cat([image, text], dim=1)

    def _pad_text(
        self,
        context: torch.Tensor | Sequence[torch.Tensor],
        context_lens: torch.Tensor | Sequence[int] | None,
        batch: int,
    ) -> torch.Tensor:
        """[B, text_len, text_dim]: each sample's rows, zeros after its length (reference pads with
        zeros to text_len before `text_embedding`)."""
        cfg = self.config
        device = self.device
        if isinstance(context, torch.Tensor):
            if context.dim() != 3:
                raise ValueError(
                    f"context must be [B, L, text_dim] or a list of [L, text_dim], got {list(context.shape)}"
                )
            b, length, width = context.shape
            rows = context.to(device)
            if context_lens is not None:
                lens = torch.as_tensor(context_lens).reshape(-1)
                # Values are checked where that costs no device synchronisation (host tensors); on the
                # GPU a length past the context keeps every row and a negative one none.
                host = lens.device.type == "cpu"
                if lens.shape != (b,) or (host and (bool((lens > length).any()) or bool((lens < 0).any()))):
                    raise ValueError(
                        f"context_lens {lens.tolist()} do not fit context of shape {list(context.shape)}"
                    )
                lens = lens.to(device)
                keep = torch.arange(length, device=device)[None, :] < lens[:, None]
                rows = rows * keep[..., None].to(rows.dtype)
        else:
            if context_lens is not None:
                raise ValueError("context_lens is only meaningful with a padded context tensor")
            samples = list(context)
            b = len(samples)
            length = max(s.shape[0] for s in samples)
            width = samples[0].shape[-1]
            rows = torch.zeros(b, length, width, dtype=samples[0].dtype, device=device)
            for i, sample in enumerate(samples):
                rows[i, : sample.shape[0]] = sample.to(device)
        if b != batch:
            raise ValueError(f"context has {b} samples, x has {batch}")
        if width != cfg.text_dim:
            raise ValueError(f"context width {width} != text_dim {cfg.text_dim}")
        if length > cfg.text_len:
            raise ValueError(f"context has {length} rows, more than text_len {cfg.text_len}")
        return torch.nn.functional.pad(rows, (0, 0, 0, cfg.text_len - length))

    def _expression_inputs(
        self, emo_proj: torch.Tensor | None, ip_scale: float | torch.Tensor, batch: int, frames: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(emo_proj on device, ip_scale [B] float32), or (None, None) when the branch adds nothing
        (no tokens, or every scale 0: x + 0 * e == x exactly for finite e)."""
        if emo_proj is None:
            return None, None
        scales = torch.as_tensor(ip_scale, dtype=torch.float32).reshape(-1)
        if scales.numel() == 1:
            scales = scales.expand(batch)
        if scales.shape != (batch,):
            raise ValueError(
                f"ip_scale must be a float or one value per sample ({batch}), got {list(scales.shape)}"
            )
        # Skipping needs the values: looked at only on the host (a GPU tensor of zeros runs the
        # branch, which then adds exactly zero), so a step never waits for the device.
        if scales.device.type == "cpu" and bool((scales == 0).all()):
            return None, None
        scales = scales.to(self.device)
        b, f, _, width = emo_proj.shape
        if b != batch or f != frames or width != self.config.emo_dim:
            raise ValueError(
                f"emo_proj must be [B={batch}, F={frames}, K, {self.config.emo_dim}], "
                f"got {list(emo_proj.shape)}"
            )
        return emo_proj.to(self.device), scales

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*out_dim] head output (per token ordered (pt, ph, pw, c), c fastest) ->
        [B, out_dim, f*pt, h*ph, w*pw]; tokens past f*h*w (seq_len padding) are dropped."""
        b = out.shape[0]
        gf, gh, gw = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        cells = out[:, : gf * gh * gw].reshape(b, gf, gh, gw, pt, ph, pw, c)
        return cells.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, gf * pt, gh * ph, gw * pw)


def _shared(t: torch.Tensor) -> bool:
    """Every sample of t [B, ...] is the same row without looking at values: B == 1 or a stride-0
    batch (`expand`)."""
    return t.shape[0] == 1 or t.stride(0) == 0


def _shared_rows(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, t cut to their first sample where they are shared: the time embedding when t is, the
    whole stream (patch embedding and first self-attention) when x, y and t all are."""
    if _shared(t):
        t = t[:1]
        if _shared(x) and _shared(y):
            x, y = x[:1], y[:1]
    return x, y, t


def _shared_context(
    context: torch.Tensor | Sequence[torch.Tensor],
    context_lens: torch.Tensor | Sequence[int] | None,
    batch: int,
) -> tuple[torch.Tensor | Sequence[torch.Tensor], torch.Tensor | Sequence[int] | None, int]:
    """(context, context_lens, batch) reduced to one sample when every sample has the same prompt."""
    if isinstance(context, torch.Tensor):
        lens = None if context_lens is None else torch.as_tensor(context_lens)
        if context.dim() == 3 and context.shape[0] == batch > 1 and _shared(context):
            if lens is None:
                return context[:1], None, 1
            if lens.dim() == 1 and lens.shape[0] == batch and _shared(lens):
                return context[:1], lens[:1], 1
        return context, context_lens, batch
    samples = list(context)
    if len(samples) == batch > 1 and context_lens is None and all(s is samples[0] for s in samples):
        return samples[:1], None, 1
    return samples, context_lens, batch


def build_meta(config: DiTConfig) -> WanDiT:
    """The model on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return WanDiT(config)


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of our full-size DiT (built on the meta device from the manifest's `ctor`),
    in the release checkpoint's key space (no prefix)."""
    return module_tensor_shapes(build_meta(DiTConfig.from_reference(manifest["ctor"])))

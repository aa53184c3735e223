"""The umT5 text encoder (encoder half of umT5-XXL) as Wan2.1 and FlashPortrait use it.

    UMT5Encoder(config)(input_ids [B, L] int64, attention_mask [B, L] int) -> [B, L, dim]

Architecture (reference: `wan.models.wan_text_encoder.WanT5EncoderModel` with `shared_pos=False`;
golden case `t5_encoder_tiny` pins the arithmetic down):
- token embedding, then `num_layers` pre-norm blocks, then a final RMS norm; every linear bias-free;
- every block owns its relative position embedding (the "u" in umT5): bidirectional buckets of
  `key_pos - query_pos`, embedded to one bias per head, added to the logits;
- attention logits are NOT scaled by 1/sqrt(d) (T5 folds the scale into its weights);
- padded keys get the bias `finfo(dtype).min` (replaced, not added, as the reference's masked_fill);
  padded queries are still computed, so padded rows of the output are garbage the caller trims;
- feed-forward is gated: fc2(fc1(x) * gelu_tanh(gate(x))).

The pipeline trims each prompt's output to its real token count (`trim_to_lengths`) and the
transformer later zero-pads every entry back to 512 rows (`pad_to_length`); see REFERENCE.md 2.1.

Real size (`UMT5_XXL`): vocab 256384, dim 4096, ffn 10240, 64 heads, 24 layers, 32 buckets. The
release file `models_t5_umt5-xxl-enc-bf16.pth` holds exactly our state-dict keys, without a prefix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashportrait.config import ConfigError
from flashportrait.models.attention import attention
from flashportrait.models.tokenizer import UMT5Tokenizer
from flashportrait.weights import LoadReport, TensorSource, load_into, module_tensor_shapes, open_checkpoint


@dataclass(frozen=True)
class T5EncoderConfig:
    """Sizes of the umT5 encoder (field names are the golden cases' `config.neutral` names)."""

    vocab_size: int
    hidden_dim: int
    attn_dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    # umT5: one relative position embedding per block. The shared variant (T5 v1.1) is not used by
    # any release file of this project, so it is refused rather than half supported.
    per_layer_position_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.per_layer_position_bias:
            raise ConfigError("T5EncoderConfig: only per-layer position bias (umT5) is supported")
        if self.attn_dim % self.num_heads:
            raise ConfigError(
                f"T5EncoderConfig: attn_dim {self.attn_dim} is not divisible by {self.num_heads} heads"
            )
        if self.rel_pos_buckets < 4 or self.rel_pos_buckets % 2:
            raise ConfigError(
                f"T5EncoderConfig: rel_pos_buckets must be even and >= 4, got {self.rel_pos_buckets}"
            )


UMT5_XXL = T5EncoderConfig(
    vocab_size=256384,
    hidden_dim=4096,
    attn_dim=4096,
    ffn_dim=10240,
    num_heads=64,
    num_layers=24,
)


def relative_position_buckets(
    lq: int, lk: int, num_buckets: int, max_distance: int, device=None
) -> torch.Tensor:
    """Bidirectional T5 buckets of `key_pos - query_pos`: [lq, lk] int64.

    Half the buckets are for keys after the query. Within a half, distances below a quarter of the
    buckets are exact and larger ones share log-spaced buckets up to `max_distance`. The log ratio is
    float32 and truncated with `.long()`, as the reference computes it (bucket edges depend on it).
    """
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = rel.abs()
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_ratio.long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(distance < exact, distance, far)


class RMSNorm(nn.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias.

    The statistic is taken in float32 and the result cast back to a half-precision weight's dtype,
    as the reference does for its bf16 checkpoint.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class GeluTanh(nn.Module):
    """The tanh approximation of GELU (umT5's `gelu_new`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.hidden_dim, config.attn_dim, bias=False)
        self.k = nn.Linear(config.hidden_dim, config.attn_dim, bias=False)
        self.v = nn.Linear(config.hidden_dim, config.attn_dim, bias=False)
        self.o = nn.Linear(config.attn_dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim]; bias: [B or 1, H, L, L] (position bias with padded keys at dtype min)."""
        b, length, _ = x.shape
        q, k, v = (proj(x).view(b, length, self.num_heads, -1) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, bias=bias, scale=1.0)
        return self.o(out.reshape(b, length, -1))


class T5FeedForward(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        # `gate.0` is the checkpoint's key: the reference keeps Linear + GELU in one Sequential.
        self.gate = nn.Sequential(nn.Linear(config.hidden_dim, config.ffn_dim, bias=False), GeluTanh())
        self.fc1 = nn.Linear(config.hidden_dim, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.rel_pos_buckets, config.num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets: [Lq, Lk] int64 -> bias [1, H, Lq, Lk]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_dim, config.norm_eps)
        self.attn = T5Attention(config)
        self.norm2 = RMSNorm(config.hidden_dim, config.norm_eps)
        self.ffn = T5FeedForward(config)
        self.pos_embedding = T5RelativeEmbedding(config)

    def forward(
        self, x: torch.Tensor, buckets: torch.Tensor, key_padding: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [B, L, dim]; buckets: [L, L] int64; key_padding: [B, 1, 1, L] bool, True = padded key."""
        bias = self.pos_embedding(buckets).to(x.dtype)
        if key_padding is not None:
            bias = bias.masked_fill(key_padding, torch.finfo(x.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder; state-dict keys are those of `models_t5_umt5-xxl-enc-bf16.pth`."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_dim, config.norm_eps)

    def buckets(self, length: int) -> torch.Tensor:
        """[L, L] int64 bucket indices (identical for every block)."""
        cfg = self.config
        return relative_position_buckets(
            length,
            length,
            cfg.rel_pos_buckets,
            cfg.rel_pos_max_distance,
            device=self.token_embedding.weight.device,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, L] int64; attention_mask: [B, L] (0 = padding) -> [B, L, dim] in weight dtype."""
        _, length = input_ids.shape
        x = self.token_embedding(input_ids)
        key_padding = None if attention_mask is None else (attention_mask == 0)[:, None, None, :]
        buckets = self.buckets(length)
        for block in self.blocks:
            x = block(x, buckets, key_padding)
        return self.norm(x)


def trim_to_lengths(hidden: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
    """hidden [B, L, D], lengths [B] -> [hidden[b, :lengths[b]]] (views), as the pipeline passes text."""
    return [h[: int(n)] for h, n in zip(hidden, lengths, strict=True)]


def pad_to_length(embeddings: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """[L_i, D] each -> [B, length, D] with zero rows after each prompt (the transformer's text input).

    The reference zero-pads to the text length BEFORE its text-embedding MLP, so the padded rows are
    zeros here and become `text_embedding(0)` there (REFERENCE.md 2.8).
    """
    if not embeddings:
        raise ValueError("pad_to_length needs at least one embedding")
    first = embeddings[0]
    out = first.new_zeros(len(embeddings), length, first.shape[-1])
    for i, e in enumerate(embeddings):
        if e.shape[0] > length:
            raise ValueError(f"prompt {i} has {e.shape[0]} tokens, more than the text length {length}")
        out[i, : e.shape[0]] = e
    return out


def build_umt5_encoder(config: T5EncoderConfig, *, device: torch.device | str = "meta") -> UMT5Encoder:
    """The encoder with uninitialised weights on `device` (meta by default: no memory)."""
    with torch.device(device):
        return UMT5Encoder(config)


def load_umt5_encoder(
    checkpoint: str | Path | TensorSource,
    config: T5EncoderConfig = UMT5_XXL,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[UMT5Encoder, LoadReport]:
    """Load `models_t5_umt5-xxl-enc-bf16.pth` (or any file with its keys) strictly, in eval mode.

    Every key must be present with its shape (the reference loads into an empty model and needs them
    all); a mismatch raises `CheckpointMismatchError` naming the keys.
    """
    source = checkpoint if isinstance(checkpoint, TensorSource) else open_checkpoint(checkpoint)
    model = build_umt5_encoder(config)
    report = load_into(model, source, dtype=dtype, device=device)
    return model.eval(), report


def manifest_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of our full-size encoder (the release file's key space: no prefix)."""
    return module_tensor_shapes(build_umt5_encoder(UMT5_XXL))


class PromptCache:
    """A small LRU of prompt -> trimmed embedding [L, D] (the text_encoder server model's cache)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._items

    def get(self, prompt: str) -> torch.Tensor | None:
        value = self._items.get(prompt)
        if value is not None:
            self._items.move_to_end(prompt)
        return value

    def put(self, prompt: str, embedding: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._items[prompt] = embedding
        self._items.move_to_end(prompt)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class TextEncoder:
    """Prompts -> umT5 embeddings exactly as `_get_t5_prompt_embeds` makes them.

    Tokenise to the tokenizer's max length (512) with padding and mask, encode, trim each output to
    the prompt's real token count. Prompts already in the cache are not encoded again.
    """

    def __init__(self, tokenizer: UMT5Tokenizer, encoder: UMT5Encoder, *, cache_size: int = 0):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.cache = PromptCache(cache_size)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """-> one [L_i, dim] tensor per prompt, in the encoder's dtype and device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # take the hits first: storing the fresh results below may evict them
        found = {p: e for p in dict.fromkeys(prompts) if (e := self.cache.get(p)) is not None}
        todo = [p for p in dict.fromkeys(prompts) if p not in found]
        if todo:
            device = self.encoder.token_embedding.weight.device
            batch = self.tokenizer(todo)
            hidden = self.encoder(batch.input_ids.to(device), batch.attention_mask.to(device))
            for prompt, emb in zip(todo, trim_to_lengths(hidden, batch.lengths), strict=True):
                # clone: a view would keep the whole padded [L, D] batch alive in the cache
                found[prompt] = emb.clone()
                self.cache.put(prompt, found[prompt])
        return [found[p] for p in prompts]

    def encode_padded(self, prompts: str | Sequence[str], length: int | None = None) -> torch.Tensor:
        """-> [B, length, dim] zero-padded (length defaults to the tokenizer's max length, 512)."""
        return pad_to_length(self.encode(prompts), length or self.tokenizer.max_length)

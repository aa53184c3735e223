"""The per-latent-frame split of expression tokens (REFERENCE.md 2.6, quirks 7, 8 and 24).

The portrait encoder gives `tokens_per_frame` (24) tokens per video frame. The DiT's expression
cross-attention lets the query tokens of latent frame `i` attend to a fixed-length chunk of those
tokens. The reference builds the chunks with `split_audio_adapter_sequence` (token ranges) and
`split_tensor_with_padding` (a Python loop of slices and `cat`s). We compute the same chunks with one
gather through a precomputed index, so the split costs one indexing op per window.

The reference's rules, reproduced exactly:

* one chunk per latent frame: `int((F - 1) / 4) + 1` chunks for `F` video frames;
* `tpf = L / F` (a float), half width `int(2 * tpf)`, and for chunk `i >= 1` the centre
  `int((tpf * (4(i-1)+1) + tpf * (4i+1)) / 2) - 1`, range `[centre - half, centre + half]` inclusive
  (97 tokens for 24 tokens per frame);
* chunk 0's range is re-anchored to end where chunk 1 starts: `[-(2 * half - s1), s1]`;
* `expand_length` widens every range on both sides;
* out-of-range positions (front or back) become zero tokens appended at the END of the chunk (quirk 8:
  they are neither masked nor placed where they were cut off). `context_lens` counts the real tokens;
  the transformer never uses it.

With 24 tokens per frame chunk 0 is video frame 0's 24 tokens followed by 73 zeros, and chunk `i >= 1`
is the last token of video frame `4i-4` followed by all tokens of frames `4i-3..4i` (quirk 24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The reference divides the video frames into latent frames of 4 (the VAE's temporal stride), the
# first latent frame holding a single video frame.
_TEMPORAL_STRIDE = 4
_MIN_FRAMES = _TEMPORAL_STRIDE + 1


class EmotionSplitError(ValueError):
    """The expression tokens cannot be split (too few frames, or a token count that is not F * tpf)."""


def num_latent_frames(num_frames: int) -> int:
    """Latent frames (chunks) for `num_frames` video frames: `int((F - 1) / 4) + 1`."""
    return (num_frames - 1) // _TEMPORAL_STRIDE + 1


def emotion_token_ranges(num_tokens: int, num_frames: int) -> list[tuple[int, int]]:
    """The reference's inclusive token ranges, one per latent frame (`split_audio_adapter_sequence`).

    Raises `EmotionSplitError` for fewer than 5 video frames: the reference needs a second chunk to
    anchor the first one and fails there with an IndexError (quirk 7).
    """
    if num_frames < _MIN_FRAMES:
        raise EmotionSplitError(
            f"the expression tokens of {num_frames} video frame(s) cannot be split per latent frame: "
            f"at least {_MIN_FRAMES} frames (2 latent frames) are needed"
        )
    if num_tokens <= 0:
        raise EmotionSplitError(f"no expression tokens to split ({num_tokens} tokens)")
    tpf = num_tokens / num_frames
    half = int(2 * tpf)
    ranges = [(0, 0)]
    for i in range(1, num_latent_frames(num_frames)):
        centre = int((tpf * ((i - 1) * _TEMPORAL_STRIDE + 1) + tpf * (i * _TEMPORAL_STRIDE + 1)) / 2) - 1
        ranges.append((centre - half, centre + half))
    first_start = ranges[1][0]
    ranges[0] = (-(2 * half - first_start), first_start)
    return ranges


@dataclass(frozen=True)
class EmotionSplitPlan:
    """A precomputed gather for one (num_tokens, num_frames, expand_length).

    ranges: the reference's inclusive [start, end] per chunk (before `expand_length`).
    index: [P, S] int64, the source token of every chunk slot; slots holding padding point at
        `num_tokens` (an extra zero row appended before gathering).
    context_lens: [P] int64, number of real tokens per chunk.
    """

    num_tokens: int
    num_frames: int
    expand_length: int
    ranges: tuple[tuple[int, int], ...]
    index: torch.Tensor
    context_lens: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.index.shape[0]

    @property
    def chunk_length(self) -> int:
        return self.index.shape[1]

    def index_map(self) -> torch.Tensor:
        """[P, S] int64 with -1 for padding slots (the golden `emo_split_index_map` layout)."""
        return self.index.masked_fill(self.index == self.num_tokens, -1)


def plan_emotion_split(num_tokens: int, num_frames: int, expand_length: int = 0) -> EmotionSplitPlan:
    """Build the gather index that reproduces `split_tensor_with_padding` on the reference ranges."""
    if expand_length < 0:
        raise EmotionSplitError(f"expand_length must be >= 0, got {expand_length}")
    ranges = emotion_token_ranges(num_tokens, num_frames)
    lengths = {end - start + 1 + 2 * expand_length for start, end in ranges}
    if len(lengths) != 1:
        raise EmotionSplitError(f"expression token ranges of unequal length: {sorted(lengths)}")
    (chunk_length,) = lengths
    index = torch.full((len(ranges), chunk_length), num_tokens, dtype=torch.int64)
    context_lens = torch.empty(len(ranges), dtype=torch.int64)
    for row, (start, end) in enumerate(ranges):
        first = max(start - expand_length, 0)
        last = min(end + expand_length, num_tokens - 1)
        valid = max(last - first + 1, 0)
        # Valid tokens first, then all padding (front and back) at the end: quirk 8.
        index[row, :valid] = torch.arange(first, first + valid)
        context_lens[row] = valid
    return EmotionSplitPlan(
        num_tokens=num_tokens,
        num_frames=num_frames,
        expand_length=expand_length,
        ranges=tuple(ranges),
        index=index,
        context_lens=context_lens,
    )


def split_emotion_tokens(
    tokens: torch.Tensor, num_frames: int, *, expand_length: int = 0, plan: EmotionSplitPlan | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a window's expression tokens into per-latent-frame chunks.

    tokens: [B, L, D] (L = num_frames * tokens_per_frame), any dtype and device.
    Returns (chunks [B, P, S, D] in tokens' dtype, context_lens [P] int64); P latent frames, S = 97
    for 24 tokens per frame. Pass a `plan` to reuse the gather index across windows of equal length.
    """
    b, num_tokens, d = tokens.shape
    if plan is None:
        plan = plan_emotion_split(num_tokens, num_frames, expand_length)
    elif (plan.num_tokens, plan.num_frames, plan.expand_length) != (num_tokens, num_frames, expand_length):
        raise EmotionSplitError(
            f"split plan for {plan.num_tokens} tokens / {plan.num_frames} frames / expand "
            f"{plan.expand_length} used on {num_tokens} tokens / {num_frames} frames / expand {expand_length}"
        )
    padded = torch.cat([tokens, tokens.new_zeros(b, 1, d)], dim=1)
    index = plan.index.to(tokens.device)
    chunks = padded[:, index.reshape(-1)].reshape(b, plan.num_chunks, plan.chunk_length, d)
    return chunks, plan.context_lens.clone()

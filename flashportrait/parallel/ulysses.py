"""Sequence parallelism for one DiT call across the processes of a group (the Ulysses scheme).

Every rank holds the whole DiT and gets the same call. `SequenceParallel(dit, group)` adds hooks so
that inside the transformer blocks each rank keeps only its share of the tokens:

- tokens are cut on expression-group boundaries: the expression cross-attention groups the L query
  tokens into F groups of L // F consecutive tokens (F = latent frames; a group is exactly one latent
  frame when there is no seq_len padding, which is the sampler's case), so every group stays on one
  rank and the branch runs locally. Rank r gets groups [g_r, g_{r+1}) (`plan_shards`: as equal as
  possible, the larger shares last); padding tokens past F * (L // F) go to the last rank, which is
  only correct while they are fewer than its groups (otherwise the call runs unsharded, see below);
- self-attention: q, k and v of the local tokens (RMS norm and RoPE are per token, so they stay
  local with the RoPE table rows of those tokens) go through one all-to-all that trades tokens for
  heads: afterwards rank r holds all L tokens of heads [r H/P, (r+1) H/P) and attends over the full
  sequence (the key mask of seq_len padding applies unchanged); a second all-to-all returns the
  output to token shards with every head. Needs H divisible by P;
- cross-attention over the text and CLIP image keys is per query token: no exchange;
- the expression branch's renormalisation uses the mean and std of the whole [L, dim] attention
  outputs (reference `torch.mean`/`torch.std` over tokens and channels): both are taken from
  all-reduced sums (two passes, as the reference path; one pass of sum and sum of squares on the
  fast path, as `dit_blocks._moments`);
- the head runs on the local tokens and its small output [B, L_r, 64] is all-gathered, so every rank
  returns the full [B, 16, F, H, W] prediction.

Patch embedding, time embedding and the text/image context are computed on every rank (a few
milliseconds), which keeps `WanDiT.forward` itself unchanged.

How the hooks reach inside the blocks without editing `dit_blocks.py`: `install()` replaces the
module-level names `attention`, `_moments` and `_mix_expression` of `flashportrait.models.dit_blocks`
(once per process) by dispatchers that call the original unless a sharded call is active in this
thread (and, for attention, the caller is a `SelfAttention`, marked by its forward hooks). Nothing
changes for any other use of the DiT. A proper extension point in `dit_blocks.py` (an attention
function and a statistics function per block) would replace this; the tests compare the sharded
output with the single-process output on both the reference and the fast path, so a change there
that bypasses these names fails them.

When a call cannot be sharded (fewer groups than ranks, or too much seq_len padding) every rank
computes the whole call (same result, no speed-up); `fallbacks` counts such calls.

Collectives: `all_to_all_single` with uneven split sizes (NCCL on GPUs; gloo has it too, so the CPU
tests use the same code), `all_reduce` and `all_gather` with padding to the longest shard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flashportrait.models import dit_blocks
from flashportrait.models.dit_blocks import EMO_STD_EPS, SelfAttention

# Names in `dit_blocks` the dispatchers replace (see module docstring).
_PATCHED = ("attention", "_moments", "_mix_expression")


@dataclass(frozen=True)
class ShardPlan:
    """Token shards of one DiT call: rank r owns tokens [bounds[r], bounds[r+1]) and expression
    groups [group_bounds[r], group_bounds[r+1])."""

    seq_len: int
    groups: int
    bounds: tuple[int, ...]
    group_bounds: tuple[int, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    def tokens(self, rank: int) -> slice:
        return slice(self.bounds[rank], self.bounds[rank + 1])

    def group_slice(self, rank: int) -> slice:
        return slice(self.group_bounds[rank], self.group_bounds[rank + 1])


def plan_shards(seq_len: int, groups: int, world: int) -> ShardPlan | None:
    """Shards of `seq_len` tokens in `groups` expression groups of seq_len // groups tokens over
    `world` ranks, or None when no plan keeps every group on one rank (module docstring)."""
    if world < 1 or groups < 1 or seq_len < groups:
        raise ValueError(f"cannot shard {seq_len} tokens in {groups} groups over {world} ranks")
    if groups < world:
        return None
    per = seq_len // groups
    tail = seq_len - per * groups
    base, extra = divmod(groups, world)
    counts = [base + (1 if r >= world - extra else 0) for r in range(world)]
    # The last rank's `_expression` sees (g * per + tail) tokens in g groups: per // still = per.
    if tail >= counts[-1]:
        return None
    group_bounds = [0]
    for count in counts:
        group_bounds.append(group_bounds[-1] + count)
    bounds = [g * per for g in group_bounds]
    bounds[-1] = seq_len
    return ShardPlan(seq_len, groups, tuple(bounds), tuple(group_bounds))


@dataclass
class _Call:
    """The sharded call running in this thread."""

    owner: SequenceParallel
    plan: ShardPlan
    self_attention: int = 0  # > 0 inside a SelfAttention forward

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.owner.group

    @property
    def rank(self) -> int:
        return self.owner.rank


_local = threading.local()
_originals: dict[str, Callable[..., Any]] = {}
_install_lock = threading.Lock()


def _active() -> _Call | None:
    return getattr(_local, "call", None)


def install() -> None:
    """Put the dispatchers into `dit_blocks` (idempotent; see the module docstring)."""
    with _install_lock:
        if _originals:
            return
        missing = [name for name in _PATCHED if not callable(getattr(dit_blocks, name, None))]
        if missing:
            raise RuntimeError(
                f"flashportrait.models.dit_blocks no longer defines {missing}: sequence parallelism "
                "needs its attention and expression-statistics functions (parallel/ulysses.py)"
            )
        for name in _PATCHED:
            _originals[name] = getattr(dit_blocks, name)
        dit_blocks.attention = _dispatch_attention
        dit_blocks._moments = _dispatch_moments
        dit_blocks._mix_expression = _dispatch_mix_expression


def _dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    call = _active()
    if call is None or not call.self_attention:
        return _originals["attention"](q, k, v, **kwargs)
    return ulysses_attention(q, k, v, call.plan, call.rank, call.group, _originals["attention"], **kwargs)


def _dispatch_moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    call = _active()
    if call is None:
        return _originals["_moments"](t)
    return global_moments(t, call.plan.seq_len * t.shape[-1], call.group)


def _dispatch_mix_expression(x: torch.Tensor, emo: torch.Tensor, ip_scale: torch.Tensor) -> torch.Tensor:
    call = _active()
    if call is None:
        return _originals["_mix_expression"](x, emo, ip_scale)
    return global_mix_expression(x, emo, ip_scale, call.plan.seq_len * x.shape[-1], call.group)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ShardPlan,
    rank: int,
    group: dist.ProcessGroup | None,
    attend: Callable[..., torch.Tensor],
    **kwargs: Any,
) -> torch.Tensor:
    """Self-attention of sharded tokens. q, k, v: [B, L_r, H, D] this rank's tokens -> [B, L_r, H, D].

    All-to-all #1 sends rank j the local tokens of heads group j and receives every rank's tokens of
    this rank's heads ([B, L, H/P, D]); `attend` (the attention entry point, kwargs: k_lens, scale,
    backend) runs over the full sequence; all-to-all #2 sends each rank its tokens back.
    """
    if kwargs.get("bias") is not None:
        raise ValueError("sequence-parallel self-attention takes no additive bias")
    world = len(plan.sizes)
    b, local, heads, d = q.shape
    if heads % world:
        raise ValueError(f"{heads} heads cannot be split over {world} ranks")
    if local != plan.sizes[rank]:
        raise AssertionError(f"rank {rank} has {local} tokens, the plan says {plan.sizes[rank]}")
    hp = heads // world
    # [3, B, L_r, P, H/P, D] -> [P, 3, B, L_r, H/P, D]: chunk j (heads group j) goes to rank j.
    send = torch.stack([q, k, v]).view(3, b, local, world, hp, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    received = send.new_empty(3 * b * plan.seq_len * hp * d)
    dist.all_to_all_single(
        received,
        send.view(-1),
        output_split_sizes=[3 * b * n * hp * d for n in plan.sizes],
        input_split_sizes=[3 * b * local * hp * d] * world,
        group=group,
    )
    pieces = received.split([3 * b * n * hp * d for n in plan.sizes])
    full = torch.cat([p.view(3, b, n, hp, d) for p, n in zip(pieces, plan.sizes, strict=True)], dim=2)
    out = attend(full[0], full[1], full[2], **kwargs)  # [B, L, H/P, D]
    back = torch.cat([part.reshape(-1) for part in out.split(list(plan.sizes), dim=1)])
    mine = back.new_empty(world * b * local * hp * d)
    dist.all_to_all_single(
        mine,
        back,
        output_split_sizes=[b * local * hp * d] * world,
        input_split_sizes=[b * n * hp * d for n in plan.sizes],
        group=group,
    )
    # [P, B, L_r, H/P, D] -> [B, L_r, P * H/P, D]
    return mine.view(world, b, local, hp, d).permute(1, 2, 0, 3, 4).reshape(b, local, heads, d)


def global_moments(
    t: torch.Tensor, count: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dit_blocks._moments` over the tokens of every rank: per-sample mean and unbiased std over
    (tokens, channels) of the sharded t [B, L_r, C] (count = L * C values in all), each [B, 1, 1]
    float32; the sum and the sum of squares are all-reduced in one call."""
    b = t.shape[0]
    sums = torch.stack(
        [
            t.sum(dim=(1, 2), dtype=torch.float32),
            torch.linalg.vector_norm(t, dim=(1, 2), dtype=torch.float32).square(),
        ]
    )
    dist.all_reduce(sums, group=group)
    total, squares = sums.unbind(0)
    mean = total / count
    var = (squares - total * mean) / (count - 1)
    return mean.view(b, 1, 1), var.clamp_min(0).sqrt().view(b, 1, 1)


def _two_pass_moments(
    t: torch.Tensor, count: int, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over (tokens, channels) of every rank's t [B, L_r, C] float32 (count
    values in all), each [B, 1, 1]: the global mean first, then the summed squared deviations from it
    (torch.mean / torch.std's arithmetic, up to the order of the sums)."""
    total = t.sum(dim=(1, 2), keepdim=True)
    dist.all_reduce(total, group=group)
    mean = total / count
    deviations = (t - mean).square().sum(dim=(1, 2), keepdim=True)
    dist.all_reduce(deviations, group=group)
    return mean, (deviations / (count - 1)).sqrt()


def global_mix_expression(
    x: torch.Tensor, emo: torch.Tensor, ip_scale: torch.Tensor, count: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """`dit_blocks._mix_expression` with the statistics of the whole sequence (x, emo: [B, L_r, dim]
    this rank's tokens, count = L * dim; ip_scale: [B]); float32 arithmetic, returned in x's dtype."""
    xf, ef = x.float(), emo.float()
    mean_x, std_x = _two_pass_moments(xf, count, group)
    mean_e, std_e = _two_pass_moments(ef, count, group)
    ef = (ef - mean_e) * (std_x / (std_e + EMO_STD_EPS)) + mean_x
    return (xf + ip_scale.float().view(-1, 1, 1) * ef).to(x.dtype)


def gather_tokens(local: torch.Tensor, plan: ShardPlan, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, L_r, C] this rank's tokens -> [B, L, C] every rank's, in order (all_gather of shards padded
    to the longest)."""
    longest = max(plan.sizes)
    b, n, c = local.shape
    padded = local if n == longest else torch.cat([local, local.new_zeros(b, longest - n, c)], dim=1)
    parts = [torch.empty_like(padded) for _ in plan.sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :size] for p, size in zip(parts, plan.sizes, strict=True)], dim=1)


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class SequenceParallel:
    """Hooks that shard `dit`'s calls over `group` (default: the world); see the module docstring.
    Every rank of the group must make the same DiT calls with the same inputs. `remove()` undoes it."""

    def __init__(self, dit: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised (use flashportrait.parallel.launch)")
        self.dit = dit
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.calls = 0
        self.fallbacks = 0
        heads = dit.config.num_heads
        if heads % self.world:
            raise ValueError(f"the DiT's {heads} heads cannot be split over {self.world} ranks")
        install()
        self._handles = [
            dit.register_forward_pre_hook(self._begin, with_kwargs=True),
            dit.register_forward_hook(self._end, always_call=True),
            dit.head.register_forward_hook(self._gather),
        ]
        for block in dit.blocks:
            self._handles.append(block.register_forward_pre_hook(self._shard, with_kwargs=True))
        for module in dit.modules():
            if isinstance(module, SelfAttention):
                self._handles.append(module.register_forward_pre_hook(self._enter_attention))
                self._handles.append(module.register_forward_hook(self._leave_attention, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def plan_for(
        self, x: torch.Tensor, emo_proj: torch.Tensor | None, seq_len: int | None
    ) -> ShardPlan | None:
        """The shard plan of a call with latents x [B, C, F, H, W] (None: run it unsharded)."""
        _, _, frames, height, width = x.shape
        pt, ph, pw = self.dit.config.patch_size
        tokens = (frames // pt) * (height // ph) * (width // pw)
        length = tokens if seq_len is None else int(seq_len)
        groups = emo_proj.shape[1] if emo_proj is not None else frames // pt
        if length < tokens:
            return None  # WanDiT raises its own error for this
        return plan_shards(length, groups, self.world)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _argument(args, kwargs, 0, "x")
        plan = self.plan_for(x, _argument(args, kwargs, 5, "emo_proj"), kwargs.get("seq_len"))
        self.calls += 1
        if plan is None:
            self.fallbacks += 1
            return
        _local.call = _Call(self, plan)

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = _active()
        if call is not None and call.owner is self:
            _local.call = None

    def _shard(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Block inputs (x, e0, rope, k_lens, context, emo_proj, ip_scale): the stream cut to this
        rank's tokens (the first block gets the whole stream), RoPE rows and expression groups too."""
        call = _active()
        if call is None or call.owner is not self:
            return None
        if len(args) != 7:
            raise RuntimeError(
                f"sequence parallelism expects DiTBlock(x, e0, rope, k_lens, context, emo_proj, ip_scale) "
                f"positionally, got {len(args)} positional arguments"
            )
        x, e0, (cos, sin), k_lens, context, emo, scales = args
        tokens = call.plan.tokens(self.rank)
        if x.shape[1] == call.plan.seq_len:
            x = x[:, tokens].contiguous()
        if emo is not None:
            emo = emo[:, call.plan.group_slice(self.rank)]
        return (x, e0, (cos[tokens], sin[tokens]), k_lens, context, emo, scales), kwargs

    def _gather(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        call = _active()
        if call is None or call.owner is not self:
            return None
        return gather_tokens(output, call.plan, self.group)

    def _enter_attention(self, module: nn.Module, args: tuple) -> None:
        call = _active()
        if call is not None and call.owner is self:
            call.self_attention += 1

    def _leave_attention(self, module: nn.Module, args: tuple, output: Any) -> None:
        call = _active()
        if call is not None and call.owner is self:
            call.self_attention -= 1


__all__ = [
    "SequenceParallel",
    "ShardPlan",
    "gather_tokens",
    "global_mix_expression",
    "global_moments",
    "install",
    "plan_shards",
    "ulysses_attention",
]

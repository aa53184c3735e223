"""One attention entry point for every attention in every model.

    attention(q, k, v, k_lens=None, bias=None, scale=None, backend=None) -> out

Layout: q [B, Lq, H, D], k and v [B, Lk, H, D], out [B, Lq, H, D] in q's dtype. `k_lens` [B] masks
keys at positions >= k_lens[b] (queries are never masked: the reference computes padded queries too).
`bias` is an additive float bias broadcastable to [B, H, Lq, Lk] (umT5's relative position bias).
`scale` defaults to 1/sqrt(D); umT5 passes 1.0.

Backends, fastest first on a Hopper GPU: FlashAttention-3 (`flash_attn_interface`), cuDNN attention
through PyTorch SDPA, FlashAttention-2 (`flash_attn`), SDPA's own flash kernel, SDPA's memory-efficient
kernel, SDPA math. On the CPU, and whenever float32/float64 inputs reach it without an explicit backend,
the `exact` backend runs plain softmax(q k^T * scale) v in the input precision: the arithmetic the
golden vectors were produced with. A requested backend (argument or `set_default_backend`) that
cannot serve a call (missing package, a bias with FlashAttention, float32 with FlashAttention) is an
error, not a silent fallback; the automatic choice moves on to the next backend instead.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

BACKENDS = ("exact", "fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa")
# Order tried by `auto` on CUDA for half-precision inputs (measured on an H200: cuDNN beats FA2, see
# BENCHMARKS.md; FA3 is faster still where it is built).
_AUTO_ORDER = ("fa3", "sdpa_cudnn", "fa2", "sdpa_flash", "sdpa_efficient", "sdpa_math")

_default_backend: str | None = None


class AttentionBackendError(RuntimeError):
    """The requested attention backend is not available or cannot serve this call."""


@cache
def _fa3():
    try:
        import flash_attn_interface  # FlashAttention-3 (Hopper build)
    except ImportError:
        return None
    return flash_attn_interface


@cache
def _fa2():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["exact", "sdpa_math", "sdpa"]
    found = []
    if _fa3() is not None:
        found.append("fa3")
    found += ["sdpa_cudnn"]
    if _fa2() is not None:
        found.append("fa2")
    found += ["sdpa_flash", "sdpa_efficient", "sdpa_math", "sdpa", "exact"]
    return found


def set_default_backend(name: str | None) -> None:
    """Pin the backend used when a call does not name one (None: choose per call)."""
    global _default_backend
    if name is not None and name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    _default_backend = name


def default_backend() -> str | None:
    return _default_backend


def _candidates(q: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    """Backends `auto` tries, fastest first; the last one always serves."""
    if q.device.type != "cuda" or q.dtype in (torch.float32, torch.float64):
        return ["exact"]
    names = []
    for name in _AUTO_ORDER:
        if name == "fa3" and (_fa3() is None or bias is not None):
            continue
        if name == "fa2" and (_fa2() is None or bias is not None):
            continue
        names.append(name)
    return [*names, "sdpa"]


def _choose(q: torch.Tensor, bias: torch.Tensor | None) -> str:
    return _candidates(q, bias)[0]


def _key_mask(k_lens: torch.Tensor, lk: int, device: torch.device) -> torch.Tensor:
    """[B, 1, 1, Lk] boolean, True where a key may be attended."""
    positions = torch.arange(lk, device=device)
    return (positions[None, :] < k_lens.to(device)[:, None])[:, None, None, :]


def _exact(q, k, v, k_lens, bias, scale) -> torch.Tensor:
    # [B, H, Lq, D] x [B, H, D, Lk]: float32/float64 inputs in their own precision (the goldens'
    # arithmetic); half-precision inputs are computed in float32 and rounded once at the end, since a
    # bf16 softmax would be far less accurate than every other backend.
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if k_lens is not None:
        logits = logits.masked_fill(~_key_mask(k_lens, k.shape[1], q.device), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.matmul(weights, vh).transpose(1, 2).to(out_dtype)


def _sdpa(q, k, v, k_lens, bias, scale, which: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = None
    if k_lens is not None:
        mask = _key_mask(k_lens, k.shape[1], q.device)
        if bias is not None:
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
                ~mask, float("-inf")
            ) + bias.to(q.dtype)
    elif bias is not None:
        mask = bias.to(q.dtype)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kernels = {
        "sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION],
        "sdpa_flash": [SDPBackend.FLASH_ATTENTION],
        "sdpa_efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "sdpa_math": [SDPBackend.MATH],
    }.get(which)
    if kernels is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    else:
        try:
            with sdpa_kernel(kernels):
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        except RuntimeError as exc:
            raise AttentionBackendError(f"attention backend {which} cannot run this call: {exc}") from exc
    return out.transpose(1, 2)


def _flash(q, k, v, k_lens, scale, which: str) -> torch.Tensor:
    module = _fa3() if which == "fa3" else _fa2()
    if module is None:
        raise AttentionBackendError(
            f"attention backend {which} is not installed (pip install the 'gpu' extra)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(f"attention backend {which} needs float16/bfloat16 inputs, got {q.dtype}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if k_lens is None or bool((k_lens == lk).all()):
        out = module.flash_attn_func(q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out
    # Variable key lengths: pack the valid keys and keep every query (queries are not masked).
    lens = k_lens.to(device=q.device, dtype=torch.int32)
    valid = _key_mask(lens, lk, q.device)[:, 0, 0, :]
    kp, vp = k[valid], v[valid]
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
    out = module.flash_attn_varlen_func(
        q.reshape(b * lq, h, d), kp, vp, cu_q, cu_k, lq, int(lens.max()), softmax_scale=scale
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(b, lq, h, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_lens: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention; see the module docstring for layouts and backends."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects [B, L, H, D] tensors, got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k_lens is not None and not isinstance(k_lens, torch.Tensor):
        k_lens = torch.as_tensor(k_lens, device=q.device)
    name = backend or _default_backend
    if name is not None:
        return _run(name, q, k, v, k_lens, bias, scale)
    # Automatic choice: a fast kernel that cannot serve this call (a key mask for SDPA's flash
    # kernel, an unsupported head size for cuDNN) hands over to the next one.
    *fast, last = _candidates(q, bias)
    for candidate in fast:
        try:
            return _run(candidate, q, k, v, k_lens, bias, scale)
        except AttentionBackendError:
            continue
    return _run(last, q, k, v, k_lens, bias, scale)


def _run(name, q, k, v, k_lens, bias, scale) -> torch.Tensor:
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "exact":
        return _exact(q, k, v, k_lens, bias, scale)
    if name in ("fa3", "fa2"):
        if bias is not None:
            raise AttentionBackendError(f"attention backend {name} does not take an additive bias")
        return _flash(q, k, v, k_lens, scale, name)
    return _sdpa(q, k, v, k_lens, bias, scale, name)

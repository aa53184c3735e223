"""The single attention entry point: exact float32 math on the CPU, backends that agree."""

from __future__ import annotations

import math

import pytest
import torch

from flashportrait.models import attention as attention_module
from flashportrait.models.attention import (
    AttentionBackendError,
    attention,
    available_backends,
    default_backend,
    set_default_backend,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def naive(q, k, v, k_lens=None, bias=None, scale=None):
    """Float64 softmax attention, one sample and head at a time (the oracle)."""
    b, lq, h, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, lq, h, d, dtype=torch.float64)
    for i in range(b):
        n = k.shape[1] if k_lens is None else int(k_lens[i])
        for j in range(h):
            logits = q[i, :, j].double() @ k[i, :n, j].double().T * scale
            if bias is not None:
                logits = logits + bias.expand(b, h, lq, k.shape[1])[i, j, :, :n].double()
            out[i, :, j] = torch.softmax(logits, dim=-1) @ v[i, :n, j].double()
    return out


def qkv(b=2, lq=9, lk=13, h=3, d=8, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype) for n in (lq, lk, lk)]


@pytest.mark.parametrize("backend", [None, "exact", "sdpa_math", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_backends_match_float64(backend, masked):
    q, k, v = qkv()
    k_lens = torch.tensor([13, 6]) if masked else None
    bias = torch.randn(1, 3, 9, 13, generator=torch.Generator().manual_seed(4))
    for extra in ({}, {"bias": bias}, {"scale": 0.3}):
        out = attention(q, k, v, k_lens=k_lens, backend=backend, **extra)
        assert out.shape == q.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), naive(q, k, v, k_lens, **extra), rtol=1e-5, atol=1e-6)


def test_cpu_default_is_the_exact_float32_math():
    q, k, v = qkv(seed=2)
    assert torch.equal(attention(q, k, v), attention_module._exact(q, k, v, None, None, 1 / math.sqrt(8)))
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="exact"))


def test_masked_keys_have_no_influence():
    q, k, v = qkv(seed=3)
    lens = torch.tensor([5, 13])
    k2, v2 = k.clone(), v.clone()
    k2[0, 5:], v2[0, 5:] = 100.0, -100.0
    assert torch.equal(attention(q, k, v, k_lens=lens), attention(q, k2, v2, k_lens=lens))
    assert torch.equal(attention(q, k, v, k_lens=[5, 13]), attention(q, k, v, k_lens=lens))


def test_available_backends_on_cpu():
    assert available_backends("cpu") == ["exact", "sdpa_math", "sdpa"]


def test_bad_requests_are_errors():
    q, k, v = qkv()
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        attention(q, k, v, backend="magic")
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        attention(q[0], k[0], v[0])
    for name in ("fa2", "fa3"):
        with pytest.raises(AttentionBackendError, match=name):
            attention(q, k, v, backend=name)  # not installed on the CPU, or float32 inputs


def test_default_backend_is_pinned_and_restored():
    q, k, v = qkv()
    before = default_backend()
    try:
        set_default_backend("sdpa_math")
        assert default_backend() == "sdpa_math"
        torch.testing.assert_close(
            attention(q, k, v), attention(q, k, v, backend="exact"), rtol=1e-5, atol=1e-6
        )
        with pytest.raises(AttentionBackendError):
            set_default_backend("nope")
    finally:
        set_default_backend(before)
    assert default_backend() == before


# ---------------------------------------------------------------- GPU


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_backends_agree_within_bf16_error(masked):
    """Each backend's bf16 error against float32 exact attention of the same inputs stays within
    a few times PyTorch's own bf16 math error (the reference precision of the production path)."""
    q, k, v = qkv(b=2, lq=300, lk=257, h=4, d=64, seed=5, dtype=torch.bfloat16, device="cuda")
    k_lens = torch.tensor([257, 100], device="cuda") if masked else None
    want = attention(q.float(), k.float(), v.float(), k_lens=k_lens, backend="exact")
    own = (attention(q, k, v, k_lens=k_lens, backend="sdpa_math").float() - want).abs().max().item()
    served = []
    for name in available_backends("cuda"):
        try:
            out = attention(q, k, v, k_lens=k_lens, backend=name)
        except AttentionBackendError:
            continue  # e.g. SDPA's flash kernel takes no mask
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        err = (out.float() - want).abs().max().item()
        assert err <= 4 * own + 1e-3, (name, err, own)
        served.append(name)
    assert "exact" in served and len(served) >= 3, served


@needs_cuda
@pytest.mark.gpu
def test_gpu_float32_defaults_to_exact():
    q, k, v = qkv(device="cuda")
    cpu = attention(*(t.cpu() for t in (q, k, v)))
    torch.testing.assert_close(attention(q, k, v).cpu(), cpu, rtol=1e-5, atol=1e-5)

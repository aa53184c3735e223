"""Sequence parallelism on 2 CPU processes (gloo): the sharded DiT and the driven sampler give the
single-process result within float32 rounding; shard plans, the call packing and the launcher's
environment as units."""

from __future__ import annotations

import os

import pytest
import torch

from flashportrait.parallel.driver import pack, unpack
from flashportrait.parallel.launch import MULTICAST_OFF, multicast_off, spawn
from flashportrait.parallel.ulysses import plan_shards
from tests.parallel import scenarios

# The sharded call sums in another order (projections over fewer rows, attention per head subset,
# statistics reduced across ranks), so it differs by float32 rounding: a few ulps per operation,
# through 2 blocks. 1e-5 of the output's scale is ~100 float32 ulps; a wrong shard, head order or
# statistic is off by O(1).
RTOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("sequence_parallel")
    spawn(scenarios.run, 2, str(folder), backend="gloo")
    return {rank: torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("case", ["exact", "padded", "no_emo"])
def test_sharded_dit_equals_single_process(ranks, case, fast):
    single, sharded, fallbacks = ranks[0][(case, fast)]
    assert fallbacks == 0  # really sharded
    assert sharded.shape == single.shape == (2, 16, scenarios.FRAMES, scenarios.HEIGHT, scenarios.WIDTH)
    assert _close(sharded, single)
    assert not torch.equal(single[0], single[1])  # the two samples differ (ip_scale 1 vs 0.5)
    # Every rank returns the whole gathered prediction, the same bits.
    assert torch.equal(ranks[1][(case, fast)][1], sharded)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_unshardable_padding_runs_unsharded(ranks, fast):
    single, sharded, fallbacks = ranks[0][("padded_fallback", fast)]
    assert fallbacks == 1 and torch.equal(sharded, single)


def test_driven_sampler_equals_single_process(ranks):
    single, sharded, fallbacks, calls = ranks[0]["sampler"]
    assert fallbacks == 0 and calls == 2 * 2  # 2 windows x 2 steps
    assert ranks[1]["served"] == calls
    assert _close(sharded, single)


def test_shard_plans():
    plan = plan_shards(30, 5, 2)  # 5 frames of 6 tokens: the larger share last
    assert plan.bounds == (0, 12, 30) and plan.group_bounds == (0, 2, 5) and plan.sizes == (12, 18)
    plan = plan_shards(21 * 1024, 21, 4)
    assert plan.sizes == (5 * 1024, 5 * 1024, 5 * 1024, 6 * 1024)
    assert plan_shards(32, 5, 2).bounds == (0, 12, 32)  # 2 padding tokens on the last rank
    assert plan_shards(33, 5, 2) is None  # 3 padding tokens would change its groups' size
    assert plan_shards(8, 1, 2) is None  # one frame cannot be split on frame boundaries
    with pytest.raises(ValueError):
        plan_shards(3, 5, 2)


def test_packed_calls_keep_broadcast_views():
    x = torch.randn(1, 3, 4).expand(2, -1, -1)
    host = torch.tensor([1.0, 0.0])
    tensors: list[torch.Tensor] = []
    meta = pack(((x, 7), {"ip_scale": host, "names": ["a"]}), tensors)
    assert [t.shape for t in tensors] == [(1, 3, 4), (2,)]  # the shared row is sent once
    (args, kwargs) = unpack(meta, [t.clone() for t in tensors])
    assert torch.equal(args[0], x) and args[0].stride(0) == 0 and args[1] == 7
    assert torch.equal(kwargs["ip_scale"], host) and kwargs["names"] == ["a"]


def test_multicast_stays_off(monkeypatch):
    env = {"NCCL_NVLS_ENABLE": "1"}
    multicast_off(env)
    assert env == {"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}  # a set value wins
    for name in MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    multicast_off()
    assert all(os.environ[name] == value for name, value in MULTICAST_OFF.items())

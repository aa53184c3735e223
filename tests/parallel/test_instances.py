"""`device_for_instance`: the torch device of a Triton model instance from its `initialize` args."""

from __future__ import annotations

import pytest
import torch

from flashportrait.parallel import device_for_instance


def test_cpu_and_model_kinds_give_the_fallback():
    assert device_for_instance(
        {"model_instance_kind": "CPU", "model_instance_device_id": "0"}
    ) == torch.device("cpu")
    assert device_for_instance({"model_instance_kind": "MODEL"}, fallback="cpu") == torch.device("cpu")
    assert device_for_instance({}) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_gpu_instance_without_cuda_is_a_clear_error():
    args = {
        "model_instance_kind": "GPU",
        "model_instance_device_id": "1",
        "model_instance_name": "sampler_0_1",
    }
    with pytest.raises(RuntimeError, match=r"sampler_0_1: a KIND_GPU instance on GPU 1"):
        device_for_instance(args)


def test_bad_device_id_is_a_clear_error():
    with pytest.raises(RuntimeError, match="'x' is not a GPU index"):
        device_for_instance({"model_instance_kind": "KIND_GPU", "model_instance_device_id": "x"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_instance_gets_its_gpu_and_makes_it_current():
    last = torch.cuda.device_count() - 1
    device = device_for_instance({"model_instance_kind": "GPU", "model_instance_device_id": str(last)})
    assert device == torch.device("cuda", last) and torch.cuda.current_device() == last
    with pytest.raises(RuntimeError, match="is not visible"):
        device_for_instance({"model_instance_kind": "GPU", "model_instance_device_id": str(last + 1)})

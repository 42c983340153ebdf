"""engine/runtime.py helpers: the per-step augmentation generator."""

from __future__ import annotations

import pytest
import torch

from simclrv2.data.augment import SimCLRAugment
from simclrv2.engine.runtime import step_generator


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_step_generator_is_on_the_cpu_for_any_training_device(device: str) -> None:
    # torch.device("cuda") is only a name here: nothing is allocated on a GPU
    g = step_generator(torch.device(device), seed=3, step=7)
    assert g.device.type == "cpu"
    ref = step_generator(torch.device("cpu"), seed=3, step=7)
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))  # same stream everywhere
    params = SimCLRAugment(16).sample_params(4, 16, 16, step_generator(torch.device(device), 3, 7))
    assert params["crop"].device.type == "cpu"


def test_step_generator_is_a_pure_function_of_its_arguments() -> None:
    cpu = torch.device("cpu")
    draws = {args: torch.rand(3, generator=step_generator(cpu, *args)) for args in
             [(0, 0), (0, 1), (1, 0), (0, 0, 1)]}
    assert torch.equal(draws[(0, 0)], torch.rand(3, generator=step_generator(cpu, 0, 0)))
    values = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])

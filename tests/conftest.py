from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the benchmark harness and the examples live outside the installed package
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from zoo import FACTORIES, brute_force_jacobian, make_case  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    scale = b.abs().max().clamp_min(1e-300)
    return ((a - b).abs().max() / scale).item()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while the requesting module's tests run (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def zoo_reference(name: str):
    """``(case, f, J)`` for a zoo case, brute force computed once per test session."""
    case = make_case(name)
    f, J = brute_force_jacobian(case.fm, case.x)
    return case, f, J


@pytest.fixture(params=sorted(FACTORIES))
def zoo_name(request) -> str:
    return request.param


@pytest.fixture
def quiet_fallbacks():
    from pushforward import PushforwardFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PushforwardFallbackWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield

"""Device-aware chunking, with the device's memory query mocked: a GPU's chunks are as large as
the budget allows (or ``gpu_chunk_target``), a CPU's capped at ``chunk_target``; the default
budget is a fraction of the device's free memory; a chunk holds one example's rows."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn

import pushforward as pf
from pushforward.core.budget import available_memory, parse_memory
from pushforward.core.cost import Budget
from pushforward.core.options import Options

GiB = 2**30


@pytest.fixture
def gpu_memory(monkeypatch):
    """``torch.cuda.mem_get_info`` reporting 10 GiB free of 80 GiB (no GPU needed)."""
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 10 * GiB, 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_default_budget_is_a_fraction_of_the_free_device_memory(gpu_memory):
    assert available_memory(torch.device("cuda:1")) == 10 * GiB
    assert gpu_memory == [torch.device("cuda:1")]
    assert parse_memory(None, torch.device("cuda")) == 5 * GiB
    with pf.settings(budget_fraction=0.25):
        assert parse_memory(None, torch.device("cuda")) == int(2.5 * GiB)
    assert parse_memory("3GB", torch.device("cuda")) == 3 * 10**9


def test_chunk_targets_per_device():
    per_unit, held = 2**20, 0  # 1 MiB per unit
    cpu = Budget.of(64 * GiB, device="cpu")
    gpu = Budget.of(64 * GiB, device="cuda")
    assert cpu.chunk_target == pf.settings.current().chunk_target
    assert gpu.chunk_target is None
    assert cpu.chunk(per_unit, held) == cpu.chunk_target // per_unit  # cache-sized on a CPU
    assert gpu.chunk(per_unit, held) == 64 * GiB // per_unit  # as large as the budget allows
    assert gpu.chunk(per_unit, held, at_most=300) == 300
    with pf.settings(gpu_chunk_target="256MB"):
        capped = Budget.of(64 * GiB, device="cuda")
        assert capped.chunk(per_unit, held) == 256 * 10**6 // per_unit
        assert "256.0 MB" in capped.describe() and "cuda" in capped.describe()
    assert "as large as it allows on cuda" in gpu.describe()
    # the budget caps every target; a chunk holds at least one example's rows when it fits
    small = Budget.of(8 * 2**20, device="cpu")
    assert small.chunk(per_unit, held) == 8
    with pf.settings(chunk_target="1MB"):
        tight = Budget.of(GiB, device="cpu")
        assert tight.chunk(per_unit, held) == 1
        assert tight.chunk(per_unit, held, at_least=16) == 16
    assert Budget.of(4 * 2**20, device="cpu").chunk(per_unit, held, at_least=16) == 4


def _wide_mlp() -> tuple[pf.FunctionalModel, torch.Tensor, pf.Diagonal]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 200)).double().eval()
    fm = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=torch.float64))
    return fm, torch.randn(32, 8, dtype=torch.float64), S


def test_plans_size_chunks_by_device(gpu_memory, monkeypatch):
    fm, x, S = _wide_mlp()
    with pf.settings(chunk_target="64KB", replay=False, plan_cache=0):
        cpu = pf.plan(fm, x, S, strategy="reverse")
        real = Options.budget
        monkeypatch.setattr(Options, "budget", lambda self, device=None: real(self, "cuda"))
        gpu = pf.plan(fm, x, S, strategy="reverse")
        rows = 32 * 200
        assert cpu.chunk_size < rows // 8  # the CPU's cache-sized chunks
        assert gpu.chunk_size == rows  # one chunk: the GPU wants the largest that fits
        assert gpu.problem.budget.total == 5 * GiB  # half of the (mocked) free memory
        assert "as large as it allows on cuda" in str(gpu)
        torch.testing.assert_close(gpu.execute()[1], cpu.execute()[1], rtol=1e-12, atol=0)
        with pf.settings(gpu_chunk_target="1GB"):
            capped = pf.plan(fm, x, S, strategy="reverse")
        assert cpu.chunk_size < capped.chunk_size < rows


def test_a_chunk_holds_one_examples_rows():
    """Splitting an example's rows over chunks repeats its forward pass: even a tiny chunk
    target keeps an example's selected outputs (here 4 answer tokens) together."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 50))
    fm = pf.FunctionalModel(model.double().eval())
    ids = torch.randint(0, 50, (3, 7))
    answers = torch.tensor([3, 9, 17, 41]).expand(3, 7, 4)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=torch.float64))
    with pf.settings(chunk_target="1KB", replay=False):
        p = pf.plan(fm, ids, S, outputs=answers, strategy="reverse")
        assert p.chunk_size >= p.problem.rows_per_sample == 7 * 4
        got = p.execute()[1]
    want = pf.functional_variance(fm, ids, S, outputs=answers, strategy="explicit")[1]
    assert rel_err(got, want) <= 1e-12

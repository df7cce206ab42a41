"""``pushforward.core.live_memory.live_peak_bytes``: the most bytes a computation's own tensors
hold at one time, counted exactly on hand-made cases (freed tensors leave the count, views and
in-place results add nothing, known tensors are not counted), and a deep chain's live peak is
a few layers, not the sum of its activations."""

from __future__ import annotations

import torch
from torch import nn

from pushforward.core.live_memory import live_peak_bytes

N = 1000  # float64 elements: 8,000 bytes per tensor


def test_freed_tensors_leave_the_count():
    x = torch.randn(N, dtype=torch.float64)

    def steps():
        a = x * 2  # 8,000 live
        b = a + 1  # 16,000 live: the peak
        del a
        c = b.exp()  # 16,000 live again
        del b
        return c

    assert live_peak_bytes(steps, [x]) == 2 * N * 8


def test_views_in_place_results_and_known_tensors_add_nothing():
    x = torch.randn(N, dtype=torch.float64)

    def steps():
        y = x.view(10, 100).t()  # a view of a known tensor
        z = y.sin()  # the only new storage
        z.mul_(2)  # in place
        return z.t()[:10]  # a view of z

    assert live_peak_bytes(steps, [x]) == N * 8
    assert live_peak_bytes(lambda: x.sin(), []) == N * 8  # nothing known: only the result counts


def test_a_deep_chain_keeps_a_few_layers_alive():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(N, N), nn.Tanh()) for _ in range(8)]).double()
    x = torch.randn(1, N, dtype=torch.float64)
    known = [*model.parameters(), x]
    peak = live_peak_bytes(lambda: model(x), known)
    assert peak is not None and 2 * N * 8 <= peak <= 3 * N * 8  # an input and an output at once
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.requires_grad_(True)(x)
    assert saved >= 8 * N * 8  # a backward keeps every layer's tensors


def test_what_cannot_be_measured_is_none():
    on_meta = torch.empty(N, device="meta")
    assert live_peak_bytes(lambda: on_meta * 2, [on_meta]) is None

    def fails():
        raise RuntimeError("an operation the dispatch mode cannot run")

    assert live_peak_bytes(fails, []) is None

"""Jacobian products against the brute-force autograd loop, on the whole model zoo (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err, zoo_reference
from torch import nn

import pushforward as pf

TOL = 1e-10


def _examples(case, f):
    return f.shape[: f.dim() - case.fm.output_dims]


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_jacobian_matches_brute_force(zoo_name, chunk_size):
    case, f_ref, J_ref = zoo_reference(zoo_name)
    f, J = pf.jacobian(case.fm, case.x, chunk_size=chunk_size)
    assert J.shape == (*f_ref.shape, case.fm.num_params)
    assert rel_err(f, f_ref) < TOL
    assert rel_err(J, J_ref) < TOL


@pytest.mark.usefixtures("quiet_fallbacks")
def test_jvp_matches_brute_force(zoo_name):
    case, f_ref, J_ref = zoo_reference(zoo_name)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(case.fm.num_params, generator=gen, dtype=J_ref.dtype)
    f, jv = pf.jvp(case.fm, case.x, v)
    assert rel_err(f, f_ref) < TOL
    assert rel_err(jv, J_ref @ v) < TOL
    # the same tangent given as a dict
    _, jv_dict = pf.jvp(case.fm, case.x, case.fm.unflatten(v))
    assert rel_err(jv_dict, J_ref @ v) < TOL


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("chunk_size", [2, None])
def test_batched_jvp_matches_brute_force(zoo_name, chunk_size):
    case, f_ref, J_ref = zoo_reference(zoo_name)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(5, case.fm.num_params, generator=gen, dtype=J_ref.dtype)
    _f, JV = pf.batched_jvp(case.fm, case.x, V, chunk_size=chunk_size)
    assert JV.shape == (5, *f_ref.shape)
    assert rel_err(JV, torch.einsum("...p,np->n...", J_ref, V)) < TOL


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_per_example_vjp_matches_brute_force(zoo_name, chunk_size):
    case, f_ref, J_ref = zoo_reference(zoo_name)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(f_ref.shape, generator=gen, dtype=f_ref.dtype)
    f, rows = pf.per_example_vjp(case.fm, case.x, u, chunk_size=chunk_size)
    N = _examples(case, f_ref).numel()
    expected = torch.einsum(
        "nkp,nk->np", J_ref.reshape(N, -1, case.fm.num_params), u.reshape(N, -1)
    )
    assert rows.shape == (N, case.fm.num_params)
    assert rel_err(f, f_ref) < TOL
    assert rel_err(rows, expected) < TOL


@pytest.fixture
def rows_per_chunk(monkeypatch) -> list[int]:
    """Records the number of rows of every chunk the reverse-mode primitive computes."""
    import pushforward.products.vjp as reverse

    seen: list[int] = []
    original = reverse.sample_rows

    def spy(fm, params, inputs, cotangents, **kwargs):
        seen.append(cotangents.shape[0] * cotangents.shape[1])
        return original(fm, params, inputs, cotangents, **kwargs)

    monkeypatch.setattr(reverse, "sample_rows", spy)
    return seen


def test_jacobian_chunks_never_exceed_chunk_size(rows_per_chunk):
    seen = rows_per_chunk
    case, _, J_ref = zoo_reference("mlp")
    _, J = pf.jacobian(case.fm, case.x, chunk_size=4)
    assert max(seen) <= 4 and sum(seen) == J_ref[..., 0].numel()
    assert rel_err(J, J_ref) < TOL


def test_memory_budget_controls_chunks(rows_per_chunk):
    seen = rows_per_chunk
    case, _, J_ref = zoo_reference("cnn_batchnorm_eval")
    _, J_small = pf.jacobian(case.fm, case.x, memory_budget="20KB")
    small = max(seen)
    seen.clear()
    _, J_big = pf.jacobian(case.fm, case.x, memory_budget="1GB")
    assert small < max(seen)
    assert rel_err(J_small, J_ref) < TOL and rel_err(J_big, J_ref) < TOL


# -- automatic fallbacks ----------------------------------------------------------------
class NoForwardAD(torch.autograd.Function):
    """sin(x) with a backward but no forward-mode (jvp) rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)


class CustomOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(NoForwardAD.apply(self.a(x)))


class OldStyleSin(torch.autograd.Function):
    """sin(x) as an old-style autograd.Function (no setup_context): no torch.func transform
    can run it (as BackPACK's hooks), only plain autograd."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)


class OldStyleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(OldStyleSin.apply(self.a(x)))


class ItemModel(nn.Module):
    """Data-dependent control flow (``.item()``), which vmap cannot batch as such: the
    examples are split into groups reading the same value."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return h * 2 if h.sum().item() > -1e9 else h


def test_data_dependent_control_flow_stays_on_the_fast_path():
    """Python control flow on values (``.item()``) splits a vmap batch into groups of examples
    that read the same value: exact, and no fallback."""
    from zoo import brute_force_jacobian

    torch.manual_seed(0)
    fm = pf.FunctionalModel(ItemModel().double())
    x = torch.randn(3, 3, dtype=torch.float64)
    _, J_ref = brute_force_jacobian(fm, x)
    v = torch.randn(fm.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        _, jv = pf.jvp(fm, x, v)
        _, J = pf.jacobian(fm, x)
    assert rel_err(jv, J_ref @ v) < TOL and rel_err(J, J_ref) < TOL


@pytest.mark.parametrize("model_cls", [CustomOpModel, OldStyleModel])
def test_fallbacks_are_exact_and_warn_once(model_cls):
    from zoo import brute_force_jacobian

    torch.manual_seed(0)
    fm = pf.FunctionalModel(model_cls().double())
    x = torch.randn(3, 3, dtype=torch.float64)
    _f_ref, J_ref = brute_force_jacobian(fm, x)
    v = torch.randn(fm.num_params, dtype=torch.float64)
    with pytest.warns(pf.PushforwardFallbackWarning):
        _, jv = pf.jvp(fm, x, v)
        _, J = pf.jacobian(fm, x)
    assert rel_err(jv, J_ref @ v) < TOL and rel_err(J, J_ref) < TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        _, jv2 = pf.jvp(fm, x, v)  # the working method is remembered: no second warning
        _, J2 = pf.jacobian(fm, x)
    assert rel_err(jv2, J_ref @ v) < TOL and rel_err(J2, J_ref) < TOL


def test_transformer_forward_mode_runs_on_math_attention_without_a_fallback():
    """Fused attention kernels have no forward-mode derivative: forward mode uses the math
    backend from the start (issue 13: attention models stay on the fast path, no warning)."""
    case, _f_ref, J_ref = zoo_reference("transformer_encoder")
    fm = pf.FunctionalModel(case.fm.module)  # fresh wrapper: no remembered fallback
    v = torch.randn(fm.num_params, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        _, jv = pf.jvp(fm, case.x, v)
    assert rel_err(jv, J_ref @ v) < TOL


def test_plain_module_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    fm = pf.FunctionalModel(model)
    _, J_ref = pf.jacobian(fm, x)
    _, J = pf.jacobian(model, x)
    assert torch.equal(J, J_ref)


def test_bad_tangents_are_rejected():
    case, _, _ = zoo_reference("mlp")
    P = case.fm.num_params
    with pytest.raises(ValueError, match="expected"):
        pf.jvp(case.fm, case.x, torch.randn(P + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        pf.jvp(case.fm, case.x, torch.full((P,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(n, "):
        pf.batched_jvp(case.fm, case.x, torch.randn(P, dtype=torch.float64))
    with pytest.raises(ValueError, match="output's shape"):
        pf.per_example_vjp(case.fm, case.x, torch.randn(2, 2, dtype=torch.float64))


def test_forward_mode_treats_embedding_padding_rows_like_reverse_mode():
    """PyTorch's backward gives the padding row zero gradient; forward mode must agree."""
    from zoo import brute_force_jacobian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Linear(3, 2)).double()
    fm = pf.FunctionalModel(model)
    ids = torch.tensor([[0, 1, 0], [2, 2, 4]])
    _, J_ref = brute_force_jacobian(fm, ids)
    assert J_ref[..., :3].abs().sum() == 0  # reverse mode: padding row is constant
    V = torch.randn(4, fm.num_params, dtype=torch.float64)
    _, JV = pf.batched_jvp(fm, ids, V)
    assert rel_err(JV, torch.einsum("...p,np->n...", J_ref, V)) < TOL

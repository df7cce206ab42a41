"""Joint covariances within groups of consecutive examples (``joint="groups"``, the q points of
a BoTorch t-batch): every strategy x covariance structure x zoo model against the blocks of the
brute-force joint covariance, float64; both direction methods of the structured strategy; the
last-layer closed forms; selected outputs; gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import rel_err, zoo_reference
from test_variance import COVS, STRATEGIES, last_layer_covs, make_cov, references
from zoo import brute_force_jacobian, make_case

import pushforward as pf
from pushforward.covariance import Diagonal, Kronecker

TOL = 1e-10
D = torch.float64
#: Slow under pytest: explicit and forward-mode strategies are left to reverse, structured and
#: auto, and small chunks are not tried.
SLOW = {"gpt2_tiny", "transformer_encoder"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small products: one thread is fastest (and immune to oversubscribed cores)."""


def blocks(joint: torch.Tensor, B: int, q: int) -> torch.Tensor:
    """The ``(B/q, q n, q n)`` diagonal blocks of a ``(B n, B n)`` joint covariance."""
    n = joint.shape[0] // B
    return torch.stack(
        [joint[g * q * n : (g + 1) * q * n, g * q * n : (g + 1) * q * n] for g in range(B // q)]
    )


def group_sizes(B: int) -> list[int]:
    return [*[q for q in range(1, B + 1) if B % q == 0 and q != B][-2:], B]


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("strategy", [*STRATEGIES, "structured"])
def test_grouped_joint_matches_brute_force(zoo_name, strategy):
    if zoo_name in SLOW and strategy in ("explicit", "forward"):
        pytest.skip("covered by the other strategies (slow here)")
    case, f_ref, J_ref = zoo_reference(zoo_name)
    B = f_ref.shape[0]
    for cov_kind in COVS:
        cov = make_cov(cov_kind, case.fm)
        joint_ref = references(case, J_ref, cov)[2]
        for q in group_sizes(B):
            for chunk in (None,) if zoo_name in SLOW else (None, 3):
                try:
                    _, got = pf.functional_covariance(
                        case.fm,
                        case.x,
                        cov,
                        joint="groups",
                        group_size=q,
                        strategy=strategy,
                        chunk_size=chunk,
                    )
                except ValueError as err:
                    assert strategy == "structured" and "cannot compute" in str(err)
                    continue
                ref = blocks(joint_ref, B, q)
                assert rel_err(got.reshape(ref.shape), ref) < TOL, (cov_kind, q, chunk)


@pytest.mark.parametrize("name", ["mlp", "multi_output_regression", "layernorm", "dict_input"])
def test_structured_direction_methods_agree(name):
    """The batched backward (batch-first layers) and vmap over examples give the same blocks."""
    case, f_ref, J_ref = zoo_reference(name)
    B = f_ref.shape[0]
    for cov_kind in ("diag", "kron", "block_mix"):
        cov = make_cov(cov_kind, case.fm)
        ref = blocks(references(case, J_ref, cov)[2], B, group_sizes(B)[0])
        q = group_sizes(B)[0]
        results = []
        for method in (0, 1):  # the ladder's first method, then vmap over examples
            fresh = make_case(name).fm
            fresh.cache.methods["layer-structured, batch-first layers"] = method
            _, got = pf.functional_covariance(
                fresh, case.x, cov, joint="groups", group_size=q, strategy="structured"
            )
            results.append(got)
            assert fresh.cache.methods["layer-structured, batch-first layers"] == method
        assert rel_err(results[0].reshape(ref.shape), ref) < TOL, cov_kind
        assert rel_err(results[1].reshape(ref.shape), ref) < TOL, cov_kind


@pytest.mark.parametrize("name", ["mlp", "multi_output_regression", "transformer_encoder"])
def test_last_layer_closed_forms_in_groups(name):
    case, _, _ = zoo_reference(name)
    fm = make_case(name, params="last_layer", example_input=case.x).fm
    _, J_ref = brute_force_jacobian(fm, case.x)
    B = J_ref.shape[0]
    shape = J_ref.shape[:-1]
    example_shape = shape[: len(shape) - fm.output_dims]
    K = shape[len(example_shape) :].numel()
    outputs = torch.randint(0, K, (*example_shape, 2), generator=torch.Generator().manual_seed(3))
    for cov_name, cov in last_layer_covs(fm).items():
        for sel in (None, outputs):
            joint_ref = references(type(case)(name, fm, case.x), J_ref, cov, sel)[2]
            for q in group_sizes(B):
                _, got = pf.functional_covariance(
                    fm,
                    case.x,
                    cov,
                    outputs=sel,
                    joint="groups",
                    group_size=q,
                    strategy="structured",
                )
                ref = blocks(joint_ref, B, q)
                assert rel_err(got.reshape(ref.shape), ref) < TOL, (cov_name, q)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("name", ["mlp", "multi_output_regression", "gpt2_tiny"])
def test_grouped_joint_selected_outputs(name):
    case, f_ref, J_ref = zoo_reference(name)
    example_shape = f_ref.shape[: f_ref.dim() - case.fm.output_dims]
    K = f_ref[(0,) * len(example_shape)].numel()
    outputs = torch.randint(0, K, (*example_shape, 2), generator=torch.Generator().manual_seed(5))
    B = example_shape[0]
    for cov_kind in ("diag", "kron", "lowrank"):
        cov = make_cov(cov_kind, case.fm, seed=1)
        joint_ref = references(case, J_ref, cov, outputs)[2]
        for strategy in ("structured", "reverse", "auto"):
            q = group_sizes(B)[0]
            try:
                _, got = pf.functional_covariance(
                    case.fm,
                    case.x,
                    cov,
                    outputs=outputs,
                    joint="groups",
                    group_size=q,
                    strategy=strategy,
                )
            except ValueError as err:
                assert "cannot compute" in str(err)
                continue
            ref = blocks(joint_ref, B, q)
            assert rel_err(got.reshape(ref.shape), ref) < TOL, (cov_kind, strategy)


def _kron_eigen(fm: pf.FunctionalModel, gen: torch.Generator) -> Kronecker:
    vecs, vals = [], []
    for shape in fm.layout.shapes.values():
        sides = [shape[0]] if len(shape) == 1 else [shape[0], shape[1:].numel()]
        vecs.append([torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=D))[0] for s in sides])
        vals.append([torch.rand(s, generator=gen, dtype=D) + 0.5 for s in sides])
    return Kronecker.from_precision_eigen(vecs, vals, deltas=0.7)


@pytest.mark.parametrize("method", [0, 1])
def test_gradcheck_grouped_joint_structured(method):
    gradcheck = partial(torch.autograd.gradcheck, fast_mode=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 2),
    ).double()
    fm = pf.FunctionalModel(model)
    fm.cache.methods["layer-structured, batch-first layers"] = method
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, dtype=D, generator=gen, requires_grad=True)
    variances = (torch.rand(fm.num_params, dtype=D, generator=gen) + 0.1).requires_grad_()
    eigen = _kron_eigen(fm, gen)

    def run(x_, v_=None):
        cov = eigen if v_ is None else Diagonal(v_)
        f, out = pf.functional_covariance(
            fm, x_, cov, joint="groups", group_size=3, strategy="structured", differentiable=True
        )
        return f, out

    assert gradcheck(run, (x, variances))
    assert gradcheck(run, (x,))

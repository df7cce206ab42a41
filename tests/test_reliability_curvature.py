"""Regressions from the second reliability audit: curvature, posteriors and the laplace-torch
backends (each test was seen failing before its fix).

References are float64 brute force (``zoo.brute_force_jacobian`` contracted with the loss
Hessian written out, see ``test_curvature.reference``).
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from test_curvature import reference
from torch import Tensor, nn

import pushforward as pf
from pushforward.curvature import (
    GGN,
    EmpiricalFisher,
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
EXACT = 1e-10


def rel(a: Tensor, b: Tensor) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def prelu_classifier(classes: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, classes)).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.randint(0, classes, (6,), generator=g)
    return pf.FunctionalModel(model), X, y


# -- 1. an op whose batching rule gives parameters a (B, B, ...) lead ------------------------------
@pytest.mark.parametrize("classes", [2, 3])
def test_prelu_curvature_is_exact(classes):
    """PyTorch's batching rule of prelu's backward under nested vmap gives every parameter before
    the PReLU a ``(B, B, ...)`` lead instead of ``(B, 1, ...)``; with one cotangent row it
    broadcast silently (the diagonal 193% off). Shapes received from a transform are checked."""
    fm, X, y = prelu_classifier(classes)
    H = reference(fm, X, y, "classification")
    ggn = GGN(fm, [(X, y)])
    assert rel(ggn.diagonal(), H.diagonal()) <= EXACT
    assert rel(ggn.dense(), H) <= EXACT
    EF = reference(fm, X, y, "classification", kind="ef")
    ef = EmpiricalFisher(fm, [(X, y)])
    assert rel(ef.diagonal(), EF.diagonal()) <= EXACT
    assert rel(ef.dense(), EF) <= EXACT
    # the PReLU weight is no layer's weight: K-FAC gives it the exact diagonal block
    kfac = ggn.kfac()
    index = fm.layout.index(["1.weight"])
    assert rel(kfac.to_dense()[index][:, index], H[index][:, index].diag().diag()) <= EXACT


@pytest.mark.parametrize("strategy", ["auto", "structured", "reverse", "forward", "explicit"])
def test_prelu_variance_with_one_output(strategy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 1)).to(DT)
    fm = pf.FunctionalModel(model)
    X = torch.randn(5, 4, dtype=DT)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    _f, J = pf.testing.brute_force_jacobian(fm, X)
    want = torch.einsum("bkp,p,bkp->bk", J, S.diagonal(), J)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
        _, var = pf.functional_variance(fm, X, S, strategy=strategy)
        _, cov = pf.functional_covariance(fm, X, S, strategy=strategy, joint=True)
    assert rel(var, want) <= EXACT
    assert rel(cov, torch.einsum("bkp,p,clp->bkcl", J, S.diagonal(), J).reshape(5, 5)) <= EXACT


def test_monte_carlo_ggn_with_one_draw_is_unbiased():
    """With ``mc_samples=1`` (one sampled gradient row per example) the estimate's mean over
    seeds is the exact GGN (within its standard error)."""
    fm, X, y = prelu_classifier(3)
    H = reference(fm, X, y, "classification").diagonal()
    draws = torch.stack([GGN(fm, [(X, y)], mc_samples=1, seed=s).diagonal() for s in range(200)])
    mean, stderr = draws.mean(0), draws.std(0) / 200**0.5
    assert bool(((mean - H).abs() <= 5 * stderr + 1e-12).all())


# -- 2. data that can be iterated once although it is not an iterator ------------------------------
class Stream:
    """Hands out one stored generator from every ``__iter__`` (a stream; a DataLoader over an
    IterableDataset that does the same)."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __iter__(self):
        return self._it


def test_data_exhausted_after_one_pass_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    # 8 batches of 20 KB: more than the 125 KB of data a 1 MB budget keeps between passes
    batches = [(torch.randn(512, 4, dtype=DT), torch.randint(0, 3, (512,))) for _ in range(8)]
    ggn = GGN(model, Stream(batches), memory_budget="1MB")
    first = ggn.diagonal()
    assert first.abs().sum() > 0
    with pytest.raises(ValueError, match="fewer examples"):
        ggn.diagonal()
    with pytest.raises(ValueError, match="fewer examples"):
        GGN(model, Stream(batches), memory_budget="1MB").lowrank(3)


# -- 3. K-FAC posterior with non-finite or invalid hyper-parameters ---------------------------------
def small_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(10, 3, dtype=DT)
    y = torch.randint(0, 3, (10,))
    return model, GGN(model, [(X, y)])


@pytest.mark.parametrize("structure", ["diagonal", "dense", "kfac", "lowrank"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prior_precision": float("nan")}, "prior precision"),
        ({"prior_precision": -1.0}, "prior precision"),
        ({"prior_precision": 1.0, "temperature": float("nan")}, "temperature"),
        ({"prior_precision": 1.0, "sigma_noise": float("nan")}, "sigma_noise"),
        ({"prior_precision": 1.0, "n_data": -3}, "n_data"),
    ],
)
def test_posterior_refuses_invalid_hyperparameters(structure, kwargs, match):
    kwargs = dict(kwargs)  # the parameter's dict is shared by every structure
    _model, ggn = small_classifier()
    curvature = ggn.lowrank(3) if structure == "lowrank" else getattr(ggn, structure)()
    with pytest.raises(ValueError, match=match):
        laplace_posterior(curvature, layout=ggn, **kwargs)
    if "n_data" in kwargs:  # the marginal likelihood reads it from the curvature operator
        return
    prior = kwargs.pop("prior_precision")
    with pytest.raises(ValueError, match=match):
        log_marginal_likelihood(ggn, curvature, prior, **kwargs)


def test_posterior_refuses_a_curvature_that_is_not_psd():
    _model, ggn = small_classifier()
    H = ggn.dense()
    bad = H - 10 * H.abs().max() * torch.eye(H.shape[0], dtype=DT)
    with pytest.raises(ValueError, match="positive"):
        laplace_posterior(bad, 1.0)
    with pytest.raises(ValueError, match="positive"):
        log_marginal_likelihood(ggn, bad, 1.0)
    with pytest.raises(ValueError, match="prior precision"):
        optimize_prior_precision(ggn, ggn.diagonal(), init_prior_prec=0.0, n_steps=2)


def test_python_float_prior_precision_is_exact_in_float64():
    _model, ggn = small_classifier()
    h = ggn.diagonal()
    S = laplace_posterior(h, 0.1)
    assert torch.equal(S.diagonal(), (h + torch.tensor(0.1, dtype=DT)).reciprocal())


# -- 5. regression diagonal of a model with non-layer parameters ------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "groupnorm", "batchnorm", "prelu_one_output"])
def test_regression_diagonal_with_non_layer_parameters(norm):
    torch.manual_seed(0)
    body = {
        "layernorm": nn.LayerNorm(6),
        "groupnorm": nn.GroupNorm(2, 6),
        "batchnorm": nn.BatchNorm1d(6),
        "prelu_one_output": nn.PReLU(),
    }[norm]
    out = 1 if norm == "prelu_one_output" else 2
    model = nn.Sequential(nn.Linear(3, 6), body, nn.Tanh(), nn.Linear(6, out)).to(DT).eval()
    X = torch.randn(7, 3, dtype=DT)
    y = torch.randn(7, out, dtype=DT)
    fm = pf.FunctionalModel(model)
    H = reference(fm, X, y, "regression")
    ggn = GGN(fm, [(X, y)], "regression")
    assert rel(ggn.diagonal(), H.diagonal()) <= EXACT
    # K-FAC gives the parameters on no layer the exact diagonal of their curvature
    index = fm.layout.index([n for n in fm.param_names if n.startswith("1.")])
    assert rel(ggn.kfac().diagonal()[index], H.diagonal()[index]) <= EXACT


# -- 7. threads on the hand-differentiated chain path -----------------------------------------------
def test_chain_curvature_in_two_threads():
    torch.manual_seed(0)
    problems = []
    for width, act in ((7, nn.Tanh), (5, nn.GELU)):
        model = nn.Sequential(nn.Linear(4, width), act(), nn.Linear(width, 3)).to(DT)
        X = torch.randn(16, 4, dtype=DT)
        y = torch.randint(0, 3, (16,))
        problems.append((model, X, y, GGN(model, [(X, y)]).diagonal()))
    errors: list[BaseException] = []

    def work(model, X, y, want):
        try:
            for _ in range(40):
                got = GGN(model, [(X, y)]).diagonal()
                assert rel(got, want) <= 1e-12, rel(got, want)  # rounding at most
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=p) for p in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- 11. labels outside [0, K) ---------------------------------------------------------------------
def test_labels_out_of_range_are_refused():
    model, _ = small_classifier()
    X = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([0, -1, 2, 1])  # -1 is not the ignore index (-100)
    for op in (EmpiricalFisher(model, [(X, y)]), GGN(model, [(X, y)])):
        with pytest.raises(ValueError, match="class indices"):
            op.diagonal()
        with pytest.raises(ValueError, match="class indices"):
            op.loss()
    with pytest.raises(ValueError, match="class indices"):
        GGN(model, [(X, torch.tensor([0, 1, 3, 1]))]).diagonal()


# -- 12. / 13. empty data ---------------------------------------------------------------------------
def test_gridsearch_without_validation_data_is_refused():
    _model, ggn = small_classifier()
    with pytest.raises(ValueError, match="val_data"):
        optimize_prior_precision(ggn, ggn.diagonal(), method="gridsearch", val_data=[])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("method", ["diagonal", "dense", "kfac", "matvec", "lowrank", "n_data"])
def test_empty_data_is_refused(reduction, method):
    model, _ = small_classifier()
    ggn = GGN(model, [], reduction=reduction)
    call = {
        "diagonal": ggn.diagonal,
        "dense": ggn.dense,
        "kfac": ggn.kfac,
        "matvec": lambda: ggn.matvec(torch.ones(ggn.num_params, dtype=DT)),
        "lowrank": lambda: ggn.lowrank(2),
        "n_data": lambda: ggn.n_data,
    }[method]
    with pytest.raises(ValueError, match="no example"):
        call()


# -- 15. soft targets in the laplace-torch backends ------------------------------------------------
def test_laplace_backends_take_soft_classification_targets():
    """Class probabilities as targets (what ``F.cross_entropy`` takes): the GGN does not depend
    on them, the empirical Fisher's gradient is ``softmax(f) - y``."""
    pytest.importorskip("laplace")
    import torch.nn.functional as F

    from pushforward.laplace_interop import PushforwardEF, PushforwardGGN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    fm = pf.FunctionalModel(model)
    X = torch.randn(10, 3, dtype=DT)
    y = torch.softmax(torch.randn(10, 3, dtype=DT), -1)
    f, J = pf.testing.brute_force_jacobian(fm, X)
    p = f.softmax(-1)
    ggn = torch.einsum("bkp,bkl,blq->pq", J, torch.diag_embed(p) - p[:, :, None] * p[:, None], J)
    g = torch.einsum("bkp,bk->bp", J, p - y)
    refs = {PushforwardGGN: ggn, PushforwardEF: g.T @ g}
    for backend, H in refs.items():
        mine = backend(model, "classification")
        loss, diag = mine.diag(X, y)
        assert rel(loss, F.cross_entropy(f, y, reduction="sum")) <= 1e-12
        assert rel(diag, H.diagonal()) <= EXACT
        _, full = mine.full(X, y)
        assert rel(full, H) <= EXACT
        _, kron = mine.kron(X, y, N=10)
        assert kron is not None
    assert rel(GGN(model, [(X, y)]).diagonal(), ggn.diagonal()) <= EXACT
    assert rel(EmpiricalFisher(model, [(X, y)]).diagonal(), (g.T @ g).diagonal()) <= EXACT


# -- minor: Lanczos asked for more pairs than the rank --------------------------------------------
def test_lowrank_above_the_rank_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(2, 3, dtype=DT)
    ggn = GGN(model, [(X, torch.tensor([0, 1]))])  # rank 2 (one row per example)
    with pytest.warns(UserWarning, match="rank"):
        values, vectors = ggn.lowrank(5)
    assert values.shape[0] == vectors.shape[1] <= 5


# -- unclear errors ---------------------------------------------------------------------------------
def test_curvature_dtype_mismatch_is_named():
    model, _ = small_classifier()
    X = torch.randn(4, 3, dtype=torch.float32)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        GGN(model, [(X, torch.tensor([0, 1, 2, 1]))]).diagonal()


def test_half_precision_posterior_is_computed_or_refused_clearly():
    _model, ggn = small_classifier()
    H = ggn.dense().half()
    try:
        S = laplace_posterior(H, 1.0)
    except (TypeError, ValueError) as err:
        assert "float16" in str(err) or "half" in str(err).lower()
    else:
        assert S.dtype == torch.float16
        want = torch.linalg.inv(ggn.dense() + torch.eye(H.shape[0], dtype=DT))
        assert rel(S.to_dense().double(), want) <= 1e-2

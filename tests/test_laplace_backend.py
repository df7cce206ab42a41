"""laplace-torch backends ``PushforwardGGN``/``PushforwardEF`` against laplace-torch's own (float64).

References: laplace-torch's default backends (``CurvlinopsGGN``/``CurvlinopsEF``) and its
``torch.func`` implementations (``GGNInterface``/``EFInterface``). Known differences of the
defaults, checked with their own tolerance or reference:

* ``full`` through curvlinops multiplies its operator by a float32 identity, so it is only
  float32-accurate (relative 1e-6) even for float64 models;
* ``full`` with ``stochastic=True`` through curvlinops draws its own Monte Carlo samples (its own
  seed), so it is compared statistically; laplace-torch's ``torch.func`` MC path (the default's
  ``diag``, and ``GGNInterface``) draws from the global generator, and ours draws the same;
* ``jacobians``/``gradients`` of laplace-torch's backends with ``last_layer=True`` are zeros,
  so its ``CurvlinopsEF`` fits ``H = 0`` for ``DiagLLLaplace``: ``AsdlEF`` is the reference there.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("laplace")
    from laplace import FunctionalLaplace, Laplace
    from laplace.curvature import (
        AsdlEF,
        CurvatureInterface,
        CurvlinopsEF,
        CurvlinopsGGN,
        EFInterface,
        GGNInterface,
    )

from laplace_models import classifier, frozen_classifier, regressor

import pushforward.curvature.passes
from pushforward.laplace_interop import PushforwardEF, PushforwardGGN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
EXACT = 1e-12
FLOAT32 = 1e-6  # curvlinops' dense operators are float32-accurate


class DictModel(nn.Module):
    """Takes one mapping positionally, as laplace-torch passes Hugging Face batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["input_ids"] * batch["attention_mask"])


def dict_classifier() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(2)
    data = [
        {
            "input_ids": torch.randn(4, dtype=DT),
            "attention_mask": (torch.rand(4) > 0.3).to(DT),
            "labels": torch.randint(0, 3, ()),
        }
        for _ in range(20)
    ]
    return DictModel().to(DT), DataLoader(data, batch_size=8)


MODELS = {
    "classification": (classifier, "classification", [70, 3, 20, 71, 5, 0, 69, 15]),
    "regression": (regressor, "regression", [3, 7, 1, 30, 20]),
    "frozen": (frozen_classifier, "classification", [50, 3, 20, 56, 0]),
}
SUBSETS = ["all", "last_layer", "subnetwork"]


def fit(make, likelihood, subset, structure, backend, backend_kwargs=None, indices=None, seed=5):
    model, loader = make()
    extra = {"subnetwork_indices": torch.tensor(indices)} if subset == "subnetwork" else {}
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend,
        backend_kwargs=dict(backend_kwargs or {}),  # laplace-torch adds keys to this dict
        prior_precision=0.7,
        **extra,
    )
    torch.manual_seed(seed)
    la.fit(loader)
    return la, loader


def references(curvature: str, subset: str, structure: str) -> list[tuple[type, dict, float]]:
    """laplace-torch backends (with kwargs and tolerance) that must give our fit."""
    dense_linop = structure == "full" and subset != "subnetwork"  # else torch.func fallback
    if curvature == "ggn":
        return [(CurvlinopsGGN, {}, FLOAT32 if dense_linop else EXACT), (GGNInterface, {}, EXACT)]
    if curvature == "mc":
        mc = {"stochastic": True}
        refs = [(GGNInterface, mc, EXACT)]
        return refs if dense_linop else [*refs, (CurvlinopsGGN, mc, EXACT)]
    if subset == "last_layer":  # laplace's own EF is zero here: AsdlEF for the diagonal
        return [(AsdlEF, {}, EXACT)] if structure == "diag" else [(CurvlinopsEF, {}, FLOAT32)]
    return [(CurvlinopsEF, {}, FLOAT32 if dense_linop else EXACT), (EFInterface, {}, EXACT)]


def assert_close(a: Tensor, b: Tensor, rtol: float) -> None:
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-300)
    assert ((a - b).abs().max() / scale).item() <= rtol


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("curvature", ["ggn", "mc", "ef"])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fit_matches_laplace_torch(model_name, subset, curvature, structure):
    make, likelihood, indices = MODELS[model_name]
    ours = PushforwardEF if curvature == "ef" else PushforwardGGN
    kwargs = {"stochastic": True} if curvature == "mc" else {}
    la, _ = fit(make, likelihood, subset, structure, ours, kwargs, indices)
    assert type(la.backend) is ours
    for backend, ref_kwargs, rtol in references(curvature, subset, structure):
        ref, _ = fit(make, likelihood, subset, structure, backend, ref_kwargs, indices)
        assert_close(la.H, ref.H, rtol)
        assert_close(la.posterior_precision, ref.posterior_precision, rtol)
        assert abs(la.loss.item() - ref.loss.item()) <= EXACT * abs(ref.loss.item())


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_monte_carlo_samples_and_seed(structure):
    """Several samples per example: same draws as laplace-torch's torch.func MC; a fixed seed
    reproduces, another seed differs."""
    kwargs = {"stochastic": True, "num_samples": 3}
    make, likelihood, _ = MODELS["classification"]
    la, _ = fit(make, likelihood, "all", structure, PushforwardGGN, kwargs, seed=3)
    ref, _ = fit(make, likelihood, "all", structure, GGNInterface, kwargs, seed=3)
    assert_close(la.H, ref.H, EXACT)
    again, _ = fit(make, likelihood, "all", structure, PushforwardGGN, kwargs, seed=3)
    assert torch.equal(again.H, la.H)
    other, _ = fit(make, likelihood, "all", structure, PushforwardGGN, kwargs, seed=4)
    assert not torch.allclose(other.H, la.H)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_monte_carlo_converges_to_exact_ggn(likelihood):
    """The MC GGN is unbiased: with many samples it approaches the exact GGN (laplace-torch's
    curvlinops MC draws differ from ours, so this is the comparison for its ``full``)."""
    make = classifier if likelihood == "classification" else regressor
    mc, _ = fit(
        make, likelihood, "all", "full", PushforwardGGN, {"stochastic": True, "num_samples": 200}
    )
    exact, _ = fit(make, likelihood, "all", "full", GGNInterface)
    assert (mc.H - exact.H).norm() / exact.H.norm() < 0.08


def backend_for(make, likelihood, subset, cls, indices=None):
    la, loader = fit(make, likelihood, subset, "diag", cls, indices=indices)
    return la.backend, next(iter(loader))


@pytest.mark.parametrize("subset", ["all", "subnetwork"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_jacobians_and_gradients_match_laplace_torch(model_name, subset):
    make, likelihood, indices = MODELS[model_name]
    backend, (X, y) = backend_for(make, likelihood, subset, PushforwardGGN, indices)
    Js, f = backend.jacobians(X)
    Js_ref, f_ref = CurvatureInterface.jacobians(backend, X)  # laplace's torch.func version
    P = len(indices) if subset == "subnetwork" else sum(p.numel() for p in backend.params)
    assert Js.shape == (len(X), f.shape[1], P)
    assert_close(Js, Js_ref, EXACT)
    assert_close(f, f_ref, EXACT)
    G, loss = backend.gradients(X, y)
    G_ref, loss_ref = CurvatureInterface.gradients(backend, X, y)
    assert_close(G, G_ref, EXACT)
    assert abs(loss.item() - loss_ref.item()) <= EXACT * loss_ref.abs().item()
    outputs = torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 0], [1, 1], [0, 0]])
    S, f_s = backend.selected_output_jacobians(X, outputs)
    S_ref, _ = CurvatureInterface.selected_output_jacobians(backend, X, outputs)
    assert_close(S, S_ref, EXACT)
    assert_close(f_s, f_ref, EXACT)
    S1, _ = backend.selected_output_jacobians(X, outputs[:, 0])
    assert_close(S1, S_ref[:, :1], EXACT)
    with pytest.raises(ValueError, match="Output selectors must match the input batch size"):
        backend.selected_output_jacobians(X, outputs[:3])


@pytest.mark.parametrize("model_name", ["classification", "regression"])
def test_last_layer_jacobians(model_name):
    make, likelihood, _ = MODELS[model_name]
    backend, (X, y) = backend_for(make, likelihood, "last_layer", PushforwardEF)
    Js, f = backend.last_layer_jacobians(X)
    Js_ref, f_ref = CurvatureInterface.last_layer_jacobians(backend, X)
    assert_close(Js, Js_ref, EXACT)
    assert torch.equal(f, f_ref)
    # laplace-torch's own `jacobians` is zero here; ours are the last layer's
    J_all, _ = backend.jacobians(X)
    assert torch.equal(J_all, Js)
    assert CurvatureInterface.jacobians(backend, X)[0].abs().max() == 0
    # per-example gradients J_n^T dloss/df_n
    G, loss = backend.gradients(X, y)
    leaf = f_ref.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(backend.lossfunc(leaf, y), leaf)
    assert_close(G, torch.einsum("bkp,bk->bp", Js_ref, g), EXACT)
    assert abs(loss.item() - backend.lossfunc(f_ref, y).item()) <= EXACT * loss.item()
    S, _ = backend.selected_output_jacobians(X, torch.ones(len(X), dtype=torch.long))
    assert_close(S, Js_ref[:, 1:2], EXACT)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_last_layer_fit_leaves_plain_features(structure):
    """laplace-torch's feature hook on the last layer must not record the engine's vmap/jvp
    tensors: after the fit its ``_features`` copy (and so the Laplace object pickles)."""
    make, likelihood, _ = MODELS["regression"]
    la, loader = fit(make, likelihood, "last_layer", structure, PushforwardGGN)
    X, _ = next(iter(loader))
    features = copy.deepcopy(la.model._features)  # a transform-wrapped tensor cannot be copied
    assert all(type(v) is torch.Tensor for v in features.values())
    f_var = la(X)[1]
    assert torch.isfinite(f_var).all()


def test_enable_backprop_to_inputs():
    make, likelihood, _ = MODELS["classification"]
    backend, (X, _) = backend_for(make, likelihood, "all", PushforwardGGN)
    grads = []
    for fn in (backend.jacobians, lambda x, **kw: CurvatureInterface.jacobians(backend, x, **kw)):
        x = X.clone().requires_grad_(True)
        Js, f = fn(x, enable_backprop=True)
        grads.append(torch.autograd.grad((Js.square().sum() + f.sum()), x)[0])
    assert_close(grads[0], grads[1], EXACT)
    Js, f = backend.jacobians(X.clone().requires_grad_(True))
    assert not Js.requires_grad and not f.requires_grad


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_mapping_inputs(subset):
    X = next(iter(dict_classifier()[1]))
    results = {}
    for name, backend in [("ours", PushforwardGGN), ("default", CurvlinopsGGN)]:
        for structure in ["diag", "full"]:
            la, _ = fit(dict_classifier, "classification", subset, structure, backend)
            results[name, structure] = la
    for structure, rtol in [("diag", EXACT), ("full", FLOAT32)]:
        assert_close(results["ours", structure].H, results["default", structure].H, rtol)
    backend = results["ours", "diag"].backend
    Js, f = backend.jacobians(X)
    ref = (
        CurvatureInterface.last_layer_jacobians(backend, X)
        if subset == "last_layer"
        else CurvatureInterface.jacobians(backend, X)
    )
    assert_close(Js, ref[0], EXACT)
    assert_close(f, ref[1], EXACT)
    # empirical Fisher: laplace-torch refuses DiagLaplace with CurvlinopsEF on mappings; ours
    # matches the diagonal of its full EF
    ef_diag, _ = fit(dict_classifier, "classification", subset, "diag", PushforwardEF)
    ef_full, _ = fit(dict_classifier, "classification", subset, "full", CurvlinopsEF)
    assert_close(ef_diag.H, ef_full.H.diagonal(), FLOAT32)
    pred = results["ours", "full"](X, pred_type="glm")
    assert_close(pred, results["default", "full"](X, pred_type="glm"), FLOAT32)


@pytest.mark.parametrize(
    ("model_name", "subset", "structure"),
    [
        ("classification", "all", "full"),
        ("classification", "last_layer", "diag"),
        ("frozen", "subnetwork", "full"),
        ("regression", "all", "diag"),
        ("regression", "last_layer", "full"),
    ],
)
def test_glm_predictive(model_name, subset, structure):
    make, likelihood, indices = MODELS[model_name]
    la, loader = fit(make, likelihood, subset, structure, PushforwardGGN, indices=indices)
    ref, _ = fit(make, likelihood, subset, structure, GGNInterface, indices=indices)
    X = next(iter(loader))[0]
    if likelihood == "regression":
        for joint in (False, True):
            mean, var = la(X, pred_type="glm", joint=joint)
            mean_ref, var_ref = ref(X, pred_type="glm", joint=joint)
            assert_close(mean, mean_ref, EXACT)
            assert_close(var, var_ref, 1e-10)
    else:
        for link in ("probit", "bridge"):
            assert_close(
                la(X, pred_type="glm", link_approx=link),
                ref(X, pred_type="glm", link_approx=link),
                1e-10,
            )


def test_memory_budget_bounds_chunks(monkeypatch):
    """A tiny budget computes one row at a time, with the same result."""
    sizes = []
    inner = pushforward.curvature.passes.produce

    def spy(fm, structure, params, inputs, chunk, *args, **kwargs):
        sizes.append(
            (chunk.samples.stop - chunk.samples.start) * (chunk.rows.stop - chunk.rows.start)
        )
        return inner(fm, structure, params, inputs, chunk, *args, **kwargs)

    make, likelihood, _ = MODELS["classification"]
    ref, _ = fit(make, likelihood, "all", "full", PushforwardGGN)
    monkeypatch.setattr(pushforward.curvature.passes, "produce", spy)
    for structure in ("diag", "full"):
        with pytest.raises(pushforward.MemoryBudgetError) as too_small:
            fit(make, likelihood, "all", structure, PushforwardGGN, {"memory_budget": 1})
        need = too_small.value.need  # the smallest budget: one row at a time
        sizes.clear()
        la, _ = fit(make, likelihood, "all", structure, PushforwardGGN, {"memory_budget": need})
        if structure == "full":  # the diagonal goes through the layer structure, not rows
            assert sizes and max(sizes) == 1
        assert_close(la.H, ref.H if structure == "full" else ref.H.diagonal(), EXACT)
    sizes.clear()
    fit(make, likelihood, "all", "full", PushforwardGGN, {"memory_budget": "1GB"})
    assert max(sizes) > 1
    with pytest.raises(ValueError, match="cannot read memory budget"):
        PushforwardGGN(make()[0], "classification", memory_budget="lots")


def test_kron_is_laplace_torch_default():
    make, likelihood, _ = MODELS["classification"]
    la, _ = fit(make, likelihood, "all", "kron", PushforwardGGN)
    ref, _ = fit(make, likelihood, "all", "kron", CurvlinopsGGN)
    assert_close(la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix(), EXACT)


def test_errors_and_functional_laplace_workaround():
    model, loader = classifier()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        backend=PushforwardGGN,
        asdl_fisher_kwargs={"n_mc": 3},
    )
    with pytest.warns(UserWarning, match=r"ignores the keyword arguments \['n_mc'\]"):
        la.fit(loader)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        PushforwardGGN(model, "classification", num_samples=0)
    # FunctionalLaplace accepts only laplace-torch's own GGN classes; swap the class after
    with pytest.raises(AssertionError):
        FunctionalLaplace(model, "classification", n_subset=10, backend=PushforwardGGN)
    X = next(iter(loader))[0]
    preds = []
    for swap in (False, True):
        fl = FunctionalLaplace(model, "classification", n_subset=10, backend=CurvlinopsGGN)
        if swap:
            fl._backend_cls = PushforwardGGN
        fl.fit(loader)
        assert type(fl.backend) is (PushforwardGGN if swap else CurvlinopsGGN)
        preds.append(fl(X, pred_type="gp"))
    assert_close(preds[1], preds[0], EXACT)


def test_import_pushforward_does_not_import_laplace():
    code = "import sys, pushforward.laplace_interop; assert 'laplace' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- K-FAC, low rank and laplace-torch's keyword arguments (issues 13 and 17) ------------------
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("curvature", ["ggn", "ef"])
@pytest.mark.parametrize("model_name", ["classification", "regression", "frozen"])
def test_kron_factors_match_laplace_torch(model_name, curvature, approx):
    """Our K-FAC in laplace-torch's ``Kron`` form: the same factors as its default backend
    (curvlinops' KFAC), factor by factor, and the same posterior precision."""
    make, likelihood, _ = MODELS[model_name]
    ours, ref_cls = (
        (PushforwardGGN, CurvlinopsGGN) if curvature == "ggn" else (PushforwardEF, CurvlinopsEF)
    )
    results = []
    for backend in (ours, ref_cls):
        model, loader = make()
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure="kron",
            backend=backend,
            prior_precision=0.7,
            asdl_fisher_kwargs={"kfac_approx": approx},
        )
        la.fit(loader)
        results.append(la)
    la, ref = results
    for mine, theirs in zip(la.H_facs.kfacs, ref.H_facs.kfacs, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert_close(a, b, EXACT)
    assert_close(la.posterior_precision.to_matrix(), ref.posterior_precision.to_matrix(), EXACT)
    assert abs(la.loss.item() - ref.loss.item()) <= EXACT * abs(ref.loss.item())


@pytest.mark.parametrize("model_name", ["classification", "regression"])
def test_lowrank_laplace_without_asdfghjkl(model_name, monkeypatch):
    """``Laplace(..., hessian_structure="lowrank", backend=PushforwardGGN)`` with asdfghjkl hidden
    (``find_spec`` returns None for a module set to None in ``sys.modules``): fits the GGN's
    leading eigenpairs and predicts as its own ``glm_predictive``; other backends still refuse."""
    from laplace.baselaplace import LowRankLaplace

    from pushforward.laplace_interop import glm_predictive

    monkeypatch.setitem(sys.modules, "asdfghjkl", None)
    make, likelihood, _ = MODELS[model_name]
    model, loader = make()
    with pytest.raises(ImportError, match="asdfghjkl"):
        LowRankLaplace(model, likelihood, backend=CurvlinopsGGN)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="lowrank",
        backend=PushforwardGGN,
        backend_kwargs={"low_rank": 4},
        prior_precision=0.7,
    )
    assert isinstance(la, LowRankLaplace)
    la.fit(loader)
    full, _ = fit(make, likelihood, "all", "full", GGNInterface)
    eigenvalues = torch.linalg.eigvalsh(full.H).flip(0)[:4]
    assert_close(la.H[1], eigenvalues, 1e-8)
    assert abs(la.loss.item() - full.loss.item()) <= EXACT * abs(full.loss.item())
    X = next(iter(loader))[0]
    if likelihood == "classification":
        assert_close(la(X, pred_type="glm"), glm_predictive(la, X), 1e-10)
    else:
        mean, var = la(X, pred_type="glm")
        mean_ours, var_ours = glm_predictive(la, X)
        assert_close(mean, mean_ours, EXACT)
        assert_close(var, var_ours, 1e-10)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_parent_keyword_arguments_are_accepted():
    """laplace-torch passes ``asdl_fisher_kwargs`` to ``diag``/``full``/``kron`` as it does to
    ``CurvlinopsGGN``: ``mc_samples`` is the number of Monte Carlo draws, other keywords are
    ignored with a warning naming them."""
    make, likelihood, _ = MODELS["classification"]
    fits = {}
    for name, backend_kwargs, fisher_kwargs in (
        ("keyword", {"stochastic": True}, {"mc_samples": 10}),
        ("constructor", {"stochastic": True, "num_samples": 10}, {}),
        ("one", {"stochastic": True}, {}),
    ):
        model, loader = make()
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure="diag",
            backend=PushforwardGGN,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=fisher_kwargs,
        )
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # mc_samples is honoured: no warning
            la.fit(loader)
        fits[name] = la.H
    assert torch.equal(fits["keyword"], fits["constructor"])
    assert not torch.allclose(fits["keyword"], fits["one"])
    # the same call works with laplace-torch's own backend
    from laplace import DiagLaplace

    model, loader = make()
    DiagLaplace(
        model,
        likelihood,
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": True},
        asdl_fisher_kwargs={"mc_samples": 10},
    ).fit(loader)
    # meaningless here: ignored, with a warning that names them
    model, loader = make()
    backend = PushforwardGGN(model, likelihood)
    X, y = next(iter(loader))
    with pytest.warns(UserWarning, match=r"ignores the keyword arguments \['mc_samples', 'seed'\]"):
        backend.diag(X, y, N=len(X), mc_samples=3, seed=1)
    with pytest.warns(UserWarning, match=r"\['progressbar'\]"):
        backend.full(X, y, progressbar=True)
    with pytest.warns(UserWarning, match=r"\['fisher_type'\]"):
        backend.kron(X, y, N=len(X), kfac_approx="reduce", fisher_type="mc")
    with pytest.warns(UserWarning, match=r"\['mc_samples'\]"):
        PushforwardEF(model, likelihood).diag(X, y, mc_samples=3)

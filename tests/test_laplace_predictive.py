"""``glm_predictive`` / ``accelerate`` against laplace-torch's own ``la(x, pred_type="glm", ...)``.

float64, small models, relative error ≤ 1e-6 (in practice ~1e-15). laplace-torch's Jacobian
methods are made to raise around every call of ours, so the engine computes everything.

Monte Carlo: ``mc_sampling="output"`` (default) draws exactly as laplace-torch does, so with the
same global seed the two agree to rounding. laplace-torch 0.3 ignores ``generator`` in its GLM
path (it draws from the global generator); ours uses it, which is checked against laplace-torch
under ``torch.manual_seed`` of the generator's seed. ``mc_sampling="weight"`` draws other random
numbers (weight space): it is checked exactly against ``functional_samples`` and statistically
against laplace-torch's own predictive samples.
"""

from __future__ import annotations

import copy
import functools
import math
import pickle
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("laplace")
    import laplace.baselaplace
    from laplace import (
        DiagLaplace,
        DiagLLLaplace,
        DiagSubnetLaplace,
        FullLaplace,
        FullLLLaplace,
        FullSubnetLaplace,
        FunctionalLaplace,
        KronLaplace,
        KronLLLaplace,
        LowRankLaplace,
    )
    from laplace.curvature import CurvlinopsGGN

from laplace_models import N_DATA, classifier, regressor

import pushforward as pf
import pushforward.laplace_interop.glm as lp
from pushforward.core.cost import Budget
from pushforward.laplace_interop import accelerate, glm_predictive, restore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DT = torch.float64
TOL = 1e-6
LINKS = ("probit", "bridge", "bridge_norm", "mc")
#: Every link; ``diagonal_output`` changes the ``"mc"`` draws only (laplace-torch ignores it else).
LINK_CALLS = (
    *(dict(link_approx=link, n_samples=50) for link in LINKS),
    dict(link_approx="mc", n_samples=50, diagonal_output=True),
)


# -- models ---------------------------------------------------------------------------------


def frozen(make: Callable[[], tuple[nn.Module, DataLoader]]):
    """Subset of weights: the first layer is frozen (requires_grad=False)."""

    def make_frozen() -> tuple[nn.Module, DataLoader]:
        model, loader = make()
        model[0].requires_grad_(False)
        return model, loader

    return make_frozen


class RewardModel(nn.Module):
    """Bradley-Terry reward model as laplace-torch expects it: pairs ``(B, 2, d) -> (B, 2)``
    while fitting, single items ``(B, d) -> (B, 1)`` when predicting."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if x.dim() == 3 else out


def reward() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(2)
    X, y = torch.randn(N_DATA, 2, 3, dtype=DT), torch.randint(0, 2, (N_DATA,))
    return RewardModel().to(DT), DataLoader(TensorDataset(X, y), batch_size=8)


class TokenModel(nn.Module):
    """``(B, d) -> (B, C)``, and per token ``(B, T, d) -> (B, T, C)`` where token t sees the
    tokens up to t (a running mean of the embeddings): tokens of a sequence interact."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        if x.dim() == 3:
            steps = torch.arange(1, x.shape[1] + 1, dtype=h.dtype, device=h.device)
            h = h.cumsum(1) / steps[:, None]
        return self.head(h)


def tokens(likelihood: str) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(3)
    X = torch.randn(N_DATA, 3, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, 4, (N_DATA,))
    else:
        y = torch.randn(N_DATA, 4, dtype=DT)
    return TokenModel(4).to(DT), DataLoader(TensorDataset(X, y), batch_size=8)


class DictModel(nn.Module):
    """Takes one mapping positionally, as laplace-torch passes Hugging Face batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["input_ids"] * batch["attention_mask"])


def dict_batch(n: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randn(n, 4, generator=g, dtype=DT),
        "attention_mask": (torch.rand(n, 4, generator=g) > 0.3).to(DT),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def dict_classifier() -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(4)
    batch = dict_batch(N_DATA, 0)
    data = [{k: v[i] for k, v in batch.items()} for i in range(N_DATA)]
    return DictModel().to(DT), DataLoader(data, batch_size=8)


class LowRankGGN(CurvlinopsGGN):
    """The top eigenpairs of the exact GGN, standing in for the asdfghjkl backend that
    laplace-torch's LowRankLaplace expects (as in test_from_laplace.py)."""

    def eig_lowrank(self, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
        H, loss = 0, 0
        for X, y in loader:
            batch_loss, batch_H = self.full(X, y, N=len(loader.dataset))
            H, loss = H + batch_H, loss + batch_loss
        eigvals, eigvecs = torch.linalg.eigh(H)
        return eigvecs[:, -5:], eigvals[-5:], loss


# -- fitted posteriors ----------------------------------------------------------------------
CLASSES = {
    "full": FullLaplace,
    "diag": DiagLaplace,
    "kron": KronLaplace,
    "lowrank": LowRankLaplace,
    "full_ll": FullLLLaplace,
    "diag_ll": DiagLLLaplace,
    "kron_ll": KronLLLaplace,
    "full_subnet": FullSubnetLaplace,
    "diag_subnet": DiagSubnetLaplace,
    "full_frozen": FullLaplace,
    "diag_frozen": DiagLaplace,
    "kron_frozen": KronLaplace,
}
SUBNET = {"classification": [70, 3, 20, 71, 5, 0, 69, 15], "regression": [0, 7, 16, 20, 25, 31]}


def build(name: str, likelihood: str, make=None, **kwargs: object):
    """An unfitted laplace-torch object of class ``CLASSES[name]`` and its data."""
    if make is None:
        base = classifier if likelihood == "classification" else regressor
        make = frozen(base) if name.endswith("_frozen") else base
    model, loader = make()
    kwargs = {"prior_precision": 0.7, "temperature": 0.5, **kwargs}
    if likelihood == "regression":
        kwargs["sigma_noise"] = 1.3
    if name.endswith("_subnet"):
        kwargs.setdefault("subnetwork_indices", torch.tensor(SUBNET[likelihood]))
    if name == "lowrank":
        with pytest.MonkeyPatch.context() as mp:  # laplace-torch insists on asdfghjkl
            mp.setattr(laplace.baselaplace, "find_spec", lambda n: SimpleNamespace(name=n))
            return LowRankLaplace(model, likelihood, backend=LowRankGGN, **kwargs), loader
    return CLASSES[name](model, likelihood, **kwargs), loader


@functools.cache
def fitted(name: str, likelihood: str):
    la, loader = build(name, likelihood)
    la.fit(loader)
    return la


def inputs(likelihood: str, n: int = 5) -> Tensor:
    g = torch.Generator().manual_seed(11)
    shape = (2, 3, 3) if likelihood == "classification" else (3,)
    return torch.randn(n, *shape, generator=g, dtype=DT)


# -- checks ---------------------------------------------------------------------------------
def assert_close(ours: Tensor, ref: Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().clamp_min(1e-300)
    assert ((ours - ref).abs().max() / scale).item() <= tol


def assert_pair_close(ours, ref) -> None:
    assert isinstance(ours, tuple) and len(ours) == 2
    assert_close(ours[0], ref[0])
    assert_close(ours[1], ref[1])


@contextmanager
def no_laplace_jacobians(la) -> Iterator[None]:
    """laplace-torch's Jacobian methods raise inside the block (the engine must not use them)."""
    backend = la.backend
    names = ("jacobians", "last_layer_jacobians", "functorch_jacobians")

    def boom(*args, **kwargs):
        raise AssertionError("laplace-torch's Jacobians were used")

    for n in names:
        setattr(backend, n, boom)
    try:
        yield
    finally:
        for n in names:
            delattr(backend, n)


def ours(la, x, seed: int | None = None, **kwargs):
    with no_laplace_jacobians(la):
        if seed is not None:
            torch.manual_seed(seed)
        return glm_predictive(la, x, **kwargs)


def theirs(la, x, seed: int | None = None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return la(x, pred_type="glm", **kwargs)


# -- every class, every link ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_classification_matches_laplace_torch(name):
    la = fitted(name, "classification")
    x = inputs("classification")
    for kw in LINK_CALLS:
        p = ours(la, x, seed=7, **kw)
        assert_close(p, theirs(la, x, seed=7, **kw))
        assert torch.allclose(p.sum(-1), torch.ones(len(x), dtype=DT))
    # joint is ignored for classification, as in laplace-torch
    assert_close(ours(la, x, joint=True), theirs(la, x, joint=True))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_regression_matches_laplace_torch(name):
    la = fitted(name, "regression")
    x = inputs("regression")
    for joint in (False, True):
        for diagonal_output in (False, True):
            kw = dict(joint=joint, diagonal_output=diagonal_output)
            got = ours(la, x, **kw)
            assert_pair_close(got, theirs(la, x, **kw))
    f, var = ours(la, x, diagonal_output=True)
    assert f.shape == var.shape == (5, 2)
    f, cov = ours(la, x, joint=True, diagonal_output=True)  # joint takes precedence
    assert f.shape == (10,) and cov.shape == (10, 10)


@pytest.mark.parametrize("name", ["full", "diag", "kron"])
def test_reward_modeling(name):
    la, loader = build(name, "reward_modeling", make=reward)
    la.fit(loader)
    single = torch.randn(6, 3, dtype=DT)
    for joint in (False, True):
        for diagonal_output in (False, True):
            kw = dict(joint=joint, diagonal_output=diagonal_output)
            assert_pair_close(ours(la, single, **kw), theirs(la, single, **kw))
    pairs = torch.randn(6, 2, 3, dtype=DT)
    for link in ("probit", "mc"):
        kw = dict(link_approx=link, fitting=True, n_samples=40)
        assert_close(ours(la, pairs, seed=2, **kw), theirs(la, pairs, seed=2, **kw))


@pytest.mark.parametrize("link", ["bridge", "bridge_norm"])
def test_reward_modeling_bridge(link):
    """Two classes: the bridge's ``1 - 2/K`` term vanishes (its log is -inf)."""
    la, loader = build("diag", "reward_modeling", make=reward)
    la.fit(loader)
    pairs = torch.randn(6, 2, 3, dtype=DT)
    kw = dict(link_approx=link, fitting=True)
    assert_close(ours(la, pairs, **kw), theirs(la, pairs, **kw))


@pytest.mark.parametrize("name", ["diag", "kron", "full_ll", "full_subnet"])
def test_mapping_inputs(name):
    extra = {"subnetwork_indices": torch.tensor([0, 5, 30, 40, 45, 50])} if "subnet" in name else {}
    la, loader = build(name, "classification", make=dict_classifier, **extra)
    la.fit(loader)
    x = dict_batch(5, 1)
    for link in LINKS:
        kw = dict(link_approx=link, n_samples=30)
        assert_close(ours(la, x, seed=1, **kw), theirs(la, x, seed=1, **kw))


# -- Monte Carlo ----------------------------------------------------------------------------
def test_mc_generator_is_used():
    """laplace-torch 0.3's GLM path ignores ``generator`` (draws from the global generator);
    ours draws from it: the same numbers as laplace-torch after ``torch.manual_seed`` of its
    seed, and the global generator is left alone."""
    la = fitted("kron", "classification")
    x = inputs("classification")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = ours(la, x, link_approx="mc", generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(got, theirs(la, x, seed=5, link_approx="mc"))
    other = ours(la, x, link_approx="mc", generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other, got)


def test_mc_chunking_does_not_change_draws():
    """The draws are made in one call; summing them one at a time changes nothing."""
    la = fitted("full", "classification")
    x = inputs("classification")
    ref = ours(la, x, seed=3, link_approx="mc", n_samples=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Budget, "chunk", lambda self, per, held=0, at_most=None: 1)  # one per chunk
        tiny = ours(la, x, seed=3, link_approx="mc", n_samples=64)
    assert_close(tiny, ref, 1e-12)


def test_mc_weight_space_sampling():
    """``mc_sampling="weight"``: exactly the mean softmax of ``functional_samples`` with the
    same generator; statistically laplace-torch's (other draws, same expectation)."""
    la = fitted("diag", "classification")
    x = inputs("classification")
    n = 3000
    got = ours(
        la,
        x,
        link_approx="mc",
        n_samples=n,
        mc_sampling="weight",
        generator=torch.Generator().manual_seed(0),
    )
    fm, cov = pf.from_laplace(la)
    samples = pf.functional_samples(fm, x, cov, n, generator=torch.Generator().manual_seed(0))
    assert_close(got, samples.softmax(-1).mean(0), 1e-12)
    ref = la.predictive_samples(x, n_samples=n, generator=torch.Generator().manual_seed(1))
    stderr = ref.std(0) / math.sqrt(n) * math.sqrt(2)  # the difference of two estimates
    assert ((got - ref.mean(0)).abs() <= 5 * stderr + 1e-12).all()


# -- accelerate -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "likelihood"),
    [("kron", "classification"), ("full_ll", "regression"), ("diag_subnet", "classification")],
)
def test_accelerate_matches_laplace_torch(name, likelihood):
    la, loader = build(name, likelihood)
    plain, _ = build(name, likelihood)
    cls = type(la)
    assert accelerate(la) is la  # before fitting: converted at the first prediction
    assert isinstance(la, cls) and type(la).__name__ == cls.__name__ and type(la) is not cls
    la.fit(loader)
    plain.fit(loader)
    x = inputs(likelihood)
    with no_laplace_jacobians(la):
        if likelihood == "classification":
            for kw in LINK_CALLS:
                assert_close(theirs(la, x, seed=4, **kw), theirs(plain, x, seed=4, **kw))
            assert_close(
                la.predictive(x, "glm", "bridge", 10), plain.predictive(x, "glm", "bridge", 10)
            )
        else:
            for kw in (dict(), dict(joint=True), dict(diagonal_output=True)):
                assert_pair_close(la(x, **kw), plain(x, **kw))
        # laplace-torch's samplers on top of the engine's moments
        for method in ("functional_samples", "predictive_samples"):
            kw = dict(n_samples=20, generator=torch.Generator().manual_seed(9))
            got = getattr(la, method)(x, **kw)
            kw["generator"] = torch.Generator().manual_seed(9)
            assert_close(got, getattr(plain, method)(x, **kw))
    # pred_type="nn" is laplace-torch's own code
    torch.manual_seed(8)
    nn_pred = la(x, pred_type="nn", link_approx="mc", n_samples=5)
    torch.manual_seed(8)
    nn_ref = plain(x, pred_type="nn", link_approx="mc", n_samples=5)
    for a, b in zip(*(p if isinstance(p, tuple) else (p,) for p in (nn_pred, nn_ref)), strict=True):
        assert_close(a, b, 1e-12)
    # a checkpoint moves between accelerated and plain objects; copies are plain
    fresh, _ = build(name, likelihood)
    fresh.load_state_dict(la.state_dict())
    assert type(copy.deepcopy(la)) is cls
    assert restore(la) is la and type(la) is cls
    assert restore(la) is la and type(la) is cls


def test_accelerate_options_and_prior_optimization():
    la, loader = build("diag", "classification")
    plain, _ = build("diag", "classification")
    la.fit(loader)
    plain.fit(loader)
    x = inputs("classification")
    accelerate(la, mc_sampling="weight", memory_budget="64MB")
    got = la(x, link_approx="mc", n_samples=40, generator=torch.Generator().manual_seed(3))
    fm, cov = pf.from_laplace(la)
    g = torch.Generator().manual_seed(3)
    assert_close(got, pf.predictive(fm, x, cov, link="mc", n_samples=40, generator=g), 1e-12)
    # laplace-torch's grid search calls la(...): same prior precision as without acceleration
    X_val, y_val = next(iter(loader))
    val = DataLoader(TensorDataset(X_val, y_val), batch_size=8)
    for obj in (la, plain):
        obj.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=5)
    assert torch.equal(la.prior_precision, plain.prior_precision)
    assert_close(la(x), plain(x))
    assert type(pickle.loads(pickle.dumps(la))) is DiagLaplace  # pickles are plain


def test_enable_backprop_gradients():
    model, loader = classifier()
    la = DiagLaplace(model, "classification", enable_backprop=True, prior_precision=0.7)
    la.fit(loader)
    grads = []
    for fn in (ours, theirs):
        x = inputs("classification").requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(la, x)[:, 0].sum(), x)
        grads.append(grad)
    assert_close(grads[0], grads[1])
    assert not ours(fitted("diag", "classification"), inputs("classification")).requires_grad


# -- the conversion cache -------------------------------------------------------------------
def test_conversion_is_cached_and_refreshed(monkeypatch):
    calls = []
    convert = lp.from_laplace

    def counting(la):
        calls.append(type(la).__name__)
        return convert(la)

    monkeypatch.setattr(lp, "from_laplace", counting)
    la, loader = build("diag", "regression")
    la.fit(loader)
    x = inputs("regression")

    def check(expected_calls: int) -> None:
        for kw in (dict(), dict(joint=True)):
            assert_pair_close(ours(la, x, **kw), theirs(la, x, **kw))
        assert len(calls) == expected_calls

    check(1)
    check(1)  # reused
    la.prior_precision = 3.0
    check(2)
    la.prior_precision.mul_(2)  # in place: the tensor's version changes
    check(3)
    la.sigma_noise = 0.4
    check(4)
    la.temperature = 2.0
    check(5)
    la.fit(loader, override=False)  # in-place accumulation into la.H
    check(6)
    la.fit(loader)
    check(7)
    la.optimize_prior_precision(method="marglik", n_steps=3)
    check(8)


# -- sequence outputs (B, T, C) ---------------------------------------------------------------
def posterior(la) -> tuple[nn.Module, list[str], Tensor]:
    """``(module, parameter names, dense posterior covariance)`` in laplace-torch's order."""
    if isinstance(la, FullLaplace):
        cov = la.posterior_covariance
    elif isinstance(la, DiagLaplace):
        cov = torch.diag(la.posterior_variance)
    else:
        cov = la.posterior_precision.to_matrix(exponent=-1)
    if "LL" in type(la).__name__:
        module, params = la.model.model, list(la.model.last_layer.parameters())
    else:
        module, params = la.model, la.params
    by_id = {id(p): n for n, p in module.named_parameters()}
    return module, [by_id[id(p)] for p in params], cov


def token_moments(la, x: Tensor) -> tuple[Tensor, Tensor]:
    """``f (B, T, C)`` and the explicit Jacobian ``(B, T, C, P)`` via ``jacrev``."""
    module, names, _ = posterior(la)
    theta = {n: p.detach() for n, p in module.named_parameters() if n in names}

    def f(params):
        return functional_call(module, params, (x,))

    J = jacrev(f)(theta)
    return f(theta).detach(), torch.cat([J[n].flatten(3) for n in names], dim=-1)


@pytest.mark.parametrize("name", ["diag", "kron", "full_ll"])
def test_sequence_classification(name):
    la, loader = build(name, "classification", make=lambda: tokens("classification"))
    la.fit(loader)
    x = torch.randn(3, 4, 3, dtype=DT)
    f, J = token_moments(la, x)
    S = posterior(la)[2]
    cov = J @ S @ J.transpose(-1, -2)  # (B, T, C, C) per token
    assert torch.linalg.matrix_norm(cov[:, 1:]).min() > 0  # later tokens depend on earlier ones
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        la(x, pred_type="glm")  # laplace-torch rejects (B, T, C)
    for kw in LINK_CALLS:
        got = ours(la, x, seed=5, **kw)
        # laplace-torch's own link code on the per-token moments (B*T, C), (B*T, C, C)
        with pytest.MonkeyPatch.context() as mp:
            # (clones: laplace-torch's bridge updates the moments in place)
            moments = (f.flatten(0, 1).clone(), cov.flatten(0, 1).clone())
            mp.setattr(la, "_glm_predictive_distribution", lambda *a, m=moments, **k: m)
            torch.manual_seed(5)
            ref = la._glm_forward_call(x, "classification", **kw)
        assert_close(got, ref.reshape(3, 4, 4))


@pytest.mark.parametrize("name", ["full", "diag_ll"])
def test_sequence_regression(name):
    la, loader = build(name, "regression", make=lambda: tokens("regression"))
    la.fit(loader)
    x = torch.randn(3, 4, 3, dtype=DT)
    f, J = token_moments(la, x)
    S = posterior(la)[2]
    cov = J @ S @ J.transpose(-1, -2)
    assert_pair_close(ours(la, x), (f, cov))
    assert_pair_close(ours(la, x, diagonal_output=True), (f, cov.diagonal(dim1=-2, dim2=-1)))
    Jf = J.reshape(-1, J.shape[-1])  # batch, then token, then output
    assert_pair_close(ours(la, x, joint=True), (f.flatten(), Jf @ S @ Jf.T))


# -- errors ---------------------------------------------------------------------------------
def test_errors():
    la = fitted("diag", "classification")
    x = inputs("classification")
    with pytest.raises(ValueError, match=r"pred_type='glm'.*pred_type='nn'"):
        glm_predictive(la, x, pred_type="nn")
    with pytest.raises(ValueError, match="unknown link_approx 'logit'"):
        glm_predictive(la, x, link_approx="logit")
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator"):
        glm_predictive(la, x, link_approx="mc", generator=3)
    with pytest.raises(ValueError, match=r"diagonal_output=True .* needs mc_sampling='output'"):
        glm_predictive(la, x, link_approx="mc", diagonal_output=True, mc_sampling="weight")
    with pytest.raises(ValueError, match="unknown mc_sampling 'joint'"):
        glm_predictive(la, x, mc_sampling="joint")
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        accelerate(la, strategy="fast")
    with pytest.raises(ValueError, match="cannot read memory budget"):
        glm_predictive(la, x, memory_budget="lots")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        glm_predictive(la, x, link_approx="mc", n_samples=0)
    model, _ = classifier()
    with pytest.raises(ValueError, match="KronLaplace is not fitted"):
        glm_predictive(KronLaplace(model, "classification"), x)
    fl = FunctionalLaplace(model, "classification", n_subset=8, backend=CurvlinopsGGN)
    with pytest.raises(TypeError, match=r"weight-space Laplace approximations.*FunctionalLaplace"):
        glm_predictive(fl, x)
    with pytest.raises(TypeError, match=r"weight-space Laplace approximations.*FunctionalLaplace"):
        accelerate(fl)

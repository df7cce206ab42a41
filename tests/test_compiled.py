"""Replayed calls (``pushforward.compile``) equal the eager call, and notice what changes."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_variance import COVS, make_cov
from torch import nn
from zoo import make_case

import pushforward as pf

D = torch.float64
TOL = 1e-12
#: Covariances with a group per parameter tensor: the layer-structured strategy, whose plain
#: chains replay as the hand-differentiated chain.
PER_LAYER = ("diag", "isotropic", "kron", "eig_kron")


def _again(x):
    """Other inputs of the same signature."""
    if isinstance(x, dict):
        return {k: (v.flip(0) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    return x.flip(0) + 0.1 if x.is_floating_point() else x.flip(0)


def _eig_kron(fm: pf.FunctionalModel) -> pf.Kronecker:
    """A Kronecker covariance in eigen form per weight and a dense block per bias (the form
    ``from_laplace`` gives for a fitted KronLaplace)."""
    g = torch.Generator().manual_seed(3)
    blocks = {}
    for name, shape in fm.param_shapes.items():
        if len(shape) >= 2:
            out, inn = shape[0], shape[1:].numel()
            Qo, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=D))
            Qi, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=D))
            blocks[name] = pf.KroneckerEigen(Qo, Qi, torch.rand(out, inn, generator=g, dtype=D))
        else:
            A = torch.randn(shape.numel(), shape.numel(), generator=g, dtype=D)
            blocks[name] = pf.Dense(A @ A.T + torch.eye(shape.numel(), dtype=D))
    return pf.Kronecker(blocks)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("model", ["mlp", "cnn_batchnorm_eval", "gpt2_tiny", "inplace_relu"])
@pytest.mark.parametrize("cov_kind", [*COVS, "eig_kron"])
@pytest.mark.parametrize("what", ["variance", "covariance", "joint"])
def test_replay_equals_eager(model, cov_kind, what):
    case = make_case(model)
    cov = _eig_kron(case.fm) if cov_kind == "eig_kron" else make_cov(cov_kind, case.fm)
    compiled = pf.compile(case.fm, cov, case.x, what=what)
    x = _again(case.x)
    for inputs in (case.x, x, case.x):
        got = compiled(inputs)
        with pf.settings(replay=False):
            if what == "variance":
                want = pf.functional_variance(case.fm, inputs, cov)
            else:
                want = pf.functional_covariance(case.fm, inputs, cov, joint=what == "joint")
        assert rel_err(got[0], want[0]) <= TOL
        assert rel_err(got[1], want[1]) <= TOL, (compiled.program, rel_err(got[1], want[1]))
    if model in ("mlp", "inplace_relu") and what == "variance" and cov_kind in PER_LAYER:
        assert compiled.program == "chain"


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2))
    fm = pf.FunctionalModel(model.to(D))
    return fm, torch.randn(5, 6, dtype=D)


def _eager(fm, x, cov):
    with pf.settings(replay=False):
        return pf.functional_variance(fm, x, cov)


def test_replay_follows_changes():
    fm, x = _mlp()
    cov = _eig_kron(fm)
    compiled = pf.compile(fm, cov, x)
    first = compiled(x)[1]
    # in-place updates of the parameters are read at each call
    with torch.no_grad():
        for p in fm.module.parameters():
            p.mul_(1.1)
    moved = compiled(x)[1]
    assert rel_err(moved, _eager(fm, x, cov)[1]) <= TOL
    assert rel_err(moved, first) > 1e-3
    # a covariance changed in place, a parameter replaced, another batch size: a new program
    with torch.no_grad():
        cov.blocks["0.weight"].eigvals.mul_(3)
    assert rel_err(compiled(x)[1], _eager(fm, x, cov)[1]) <= TOL
    fm.module[0].weight = nn.Parameter(fm.module[0].weight.detach() * 0.5)
    assert rel_err(compiled(x)[1], _eager(fm, x, cov)[1]) <= TOL
    bigger = torch.randn(9, 6, dtype=D)
    assert rel_err(compiled(bigger)[1], _eager(fm, bigger, cov)[1]) <= TOL


def test_replay_refuses_training_mode_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2)).to(D).eval()
    fm = pf.FunctionalModel(model)
    x = torch.randn(5, 6, dtype=D)
    compiled = pf.compile(fm, pf.Diagonal(torch.rand(fm.num_params, dtype=D)), x)
    compiled(x)
    model.train()
    with pytest.raises(pf.BatchCouplingError, match="Dropout"):
        compiled(x)
    with pytest.raises(ValueError, match="what must be"):
        pf.compile(fm, pf.Diagonal(torch.rand(fm.num_params, dtype=D)), x, what="samples")


class _CountPlans:
    """Counts the plans ``functional_variance`` makes (a replayed call makes none)."""

    def __init__(self, monkeypatch):
        import pushforward.api.variance as variance

        self.calls, real = 0, variance.make_plan

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(variance, "make_plan", counting)


def _check_automatic(fm, x, cov, count, replays: bool):
    before = count.calls
    got = pf.functional_variance(fm, x, cov)
    assert (count.calls == before) == replays, "replayed" if count.calls == before else "eager"
    want = _eager(fm, x, cov)
    assert rel_err(got[0], want[0]) <= TOL and rel_err(got[1], want[1]) <= TOL
    assert not got[1].requires_grad


@pytest.mark.parametrize("cov_kind", PER_LAYER)
def test_automatic_replay_equals_eager_and_follows_changes(cov_kind, monkeypatch):
    fm, x = _mlp()
    cov = _eig_kron(fm) if cov_kind == "eig_kron" else make_cov(cov_kind, fm)
    count = _CountPlans(monkeypatch)
    _check_automatic(fm, x, cov, count, replays=False)  # the first call plans, checks, runs
    (entry,) = fm.cache.replays.values()
    assert entry[1].program == "chain"
    _check_automatic(fm, x, cov, count, replays=True)
    _check_automatic(fm, x.flip(0) * 2, cov, count, replays=True)  # other values, same signature
    with torch.no_grad():  # in-place updates are read at each call
        for p in fm.module.parameters():
            p.mul_(1.1)
    _check_automatic(fm, x, cov, count, replays=True)
    # what the program was captured from changed: the next call runs eagerly and captures anew
    changes = [
        lambda: [t.mul_(2) for t in cov.tensors()][:0],
        lambda: setattr(fm.module[0].weight, "data", fm.module[0].weight.detach() * 0.5),
        lambda: setattr(fm.module[0], "weight", nn.Parameter(fm.module[0].weight.detach() * 2)),
    ]
    for change in changes:
        with torch.no_grad():
            change()
        _check_automatic(fm, x, cov, count, replays=False)
        _check_automatic(fm, x, cov, count, replays=True)
    _check_automatic(fm, torch.randn(3, 6, dtype=D), cov, count, replays=False)  # new shape


def test_automatic_replay_notices_new_layers_hooks_and_training_mode(monkeypatch):
    fm, x = _mlp()
    cov = _eig_kron(fm)
    count = _CountPlans(monkeypatch)
    _check_automatic(fm, x, cov, count, replays=False)
    _check_automatic(fm, x, cov, count, replays=True)
    # a layer swapped for another (its parameters keep their names)
    torch.manual_seed(1)
    fm.module[1] = nn.Sigmoid()
    _check_automatic(fm, x, cov, count, replays=False)
    _check_automatic(fm, x, cov, count, replays=True)
    # a hook changes what the model computes: not a plain chain any more
    handle = fm.module[2].register_forward_hook(lambda m, i, out: out * 3)
    _check_automatic(fm, x, cov, count, replays=False)
    _check_automatic(fm, x, cov, count, replays=False)
    handle.remove()
    _check_automatic(fm, x, cov, count, replays=False)
    _check_automatic(fm, x, cov, count, replays=True)
    # a dropout layer put in training mode: the eager call's checks decide
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2)).to(D).eval()
    fm2 = pf.FunctionalModel(model)
    S = pf.Diagonal(torch.rand(fm2.num_params, dtype=D))
    _check_automatic(fm2, x, S, count, replays=False)
    _check_automatic(fm2, x, S, count, replays=True)
    model.train()
    with pytest.raises(pf.BatchCouplingError, match="Dropout"):
        pf.functional_variance(fm2, x, S)


@pytest.mark.usefixtures("quiet_fallbacks")
def test_automatic_replay_only_where_it_needs_no_checks(monkeypatch):
    count = _CountPlans(monkeypatch)
    case = make_case("cnn_batchnorm_eval")  # not a plain chain: every call runs eagerly
    cov = make_cov("diag", case.fm)
    for _ in range(2):
        _check_automatic(case.fm, case.x, cov, count, replays=False)
    fm, x = _mlp()
    S = make_cov("diag", fm)
    for kwargs in ({"differentiable": True}, {"strategy": "reverse"}, {"chunk_size": 1}):
        pf.functional_variance(fm, x, S, **kwargs)
        before = count.calls
        got = pf.functional_variance(fm, x, S, **kwargs)
        assert count.calls == before + 1
        assert rel_err(got[1], _eager(fm, x, S)[1]) <= TOL
    for _ in range(2):  # an nn.Module is wrapped anew at every call: nothing to replay from
        before = count.calls
        pf.functional_variance(fm.module, x, S)
        assert count.calls == before + 1
    with pf.settings(replay=False):
        before = count.calls
        pf.functional_variance(fm, x, S)
        assert count.calls == before + 1


@pytest.mark.parametrize("cov_kind", PER_LAYER)
def test_automatic_replay_of_per_example_covariances(cov_kind, monkeypatch):
    fm, x = _mlp()
    cov = _eig_kron(fm) if cov_kind == "eig_kron" else make_cov(cov_kind, fm)
    count = _CountPlans(monkeypatch)
    for replays in (False, True, True):
        before = count.calls
        got = pf.functional_covariance(fm, x, cov)
        assert (count.calls == before) == replays
        with pf.settings(replay=False):
            want = pf.functional_covariance(fm, x, cov)
        assert got[1].shape == want[1].shape == (5, 2, 2)
        assert rel_err(got[1], want[1]) <= TOL
    assert [e[1].program for e in fm.cache.replays.values()] == ["chain"]
    for _ in range(2):  # joint covariances run eagerly
        before = count.calls
        assert pf.functional_covariance(fm, x, cov, joint=True)[1].shape == (10, 10)
        assert count.calls == before + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize("model", ["mlp", "cnn_batchnorm_eval", "gpt2_tiny"])
@pytest.mark.parametrize("what", ["variance", "covariance", "joint"])
def test_replay_equals_eager_on_cuda(model, what):
    case = make_case(model)
    fm = pf.FunctionalModel(case.fm.module.cuda(), output_fn=case.fm.output_fn)
    cov = make_cov("diag", fm)
    x = {k: v.cuda() for k, v in case.x.items()} if isinstance(case.x, dict) else case.x.cuda()
    compiled = pf.compile(fm, cov, x, what=what)
    if model == "mlp":
        assert compiled.program == ("plan" if what == "joint" else "chain"), compiled.program
    for inputs in (x, _again(x), x):
        got = compiled(inputs)
        with pf.settings(replay=False):
            if what == "variance":
                want = pf.functional_variance(fm, inputs, cov)
            else:
                want = pf.functional_covariance(fm, inputs, cov, joint=what == "joint")
        assert rel_err(got[1], want[1]) <= TOL, (compiled.program, rel_err(got[1], want[1]))

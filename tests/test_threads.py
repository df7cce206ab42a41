"""Threads: every public entry point, called from two and four threads at once on the same model
or on different models (200 calls per configuration), gives exactly its single-threaded result
and leaves every model as it was (the same ``nn.Parameter`` objects, values, buffers, modes)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward.curvature import (
    GGN,
    EmpiricalFisher,
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)

D = torch.float64
CALLS_PER_CONFIGURATION = 200
#: Results may differ from the single-threaded ones by rounding only if a plan differs (the
#: default memory budget follows the memory available when it is made).
TOL = 1e-12


class Residual(nn.Module):
    """Not an ``nn.Sequential``: the curvature takes its general (traced) path."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = (
            nn.Linear(3, width),
            nn.Linear(width, width),
            nn.Linear(width, 3),
        )

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + torch.tanh(self.hidden(h)))


def _sequential(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 3))


def _models(kind: str) -> list[nn.Module]:
    """Four different models of one kind (float64, eval mode)."""
    out = []
    for i in range(4):
        torch.manual_seed(10 + i)
        out.append((Residual if kind == "residual" else _sequential)(6 + 2 * i).double().eval())
    return out


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(6, 3, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g)


Job = Callable[[nn.Module, pf.FunctionalModel, torch.Tensor, torch.Tensor], object]


def _functional_jobs() -> dict[str, Job]:
    def cov(fm):
        return pf.Diagonal(torch.linspace(0.05, 0.2, fm.num_params, dtype=D))

    def tangents(fm, n):
        return torch.linspace(-1, 1, n * fm.num_params, dtype=D).reshape(n, fm.num_params)

    return {
        "functional_variance": lambda m, fm, x, y: pf.functional_variance(fm, x, cov(fm)),
        "functional_variance reverse": lambda m, fm, x, y: pf.functional_variance(
            fm, x, cov(fm), strategy="reverse"
        ),
        "functional_covariance joint": lambda m, fm, x, y: pf.functional_covariance(
            fm, x, cov(fm), joint=True
        ),
        "functional_samples": lambda m, fm, x, y: pf.functional_samples(
            fm, x, cov(fm), 8, generator=torch.Generator().manual_seed(0)
        ),
        "predictive": lambda m, fm, x, y: pf.predictive(fm, x, cov(fm), link="probit"),
        "jvp": lambda m, fm, x, y: pf.jvp(fm, x, tangents(fm, 1)[0]),
        "batched_jvp": lambda m, fm, x, y: pf.batched_jvp(fm, x, tangents(fm, 5)),
        "per_example_vjp": lambda m, fm, x, y: pf.per_example_vjp(
            fm, x, torch.ones(x.shape[0], 3, dtype=D)
        ),
        "jacobian": lambda m, fm, x, y: pf.jacobian(fm, x),
        "plan execute": lambda m, fm, x, y: pf.plan(fm, x, cov(fm), kind="covariance").execute(),
        "an nn.Module": lambda m, fm, x, y: pf.functional_variance(m, x, cov(fm)),
        "FunctionalModel construction": lambda m, fm, x, y: torch.cat(
            [p.reshape(-1) for p in pf.FunctionalModel(m).params().values()]
        ),
    }


def _curvature_jobs() -> dict[str, Job]:
    def ggn(fm, x, y):
        return GGN(fm, [(x, y)], "classification")

    return {
        "GGN diagonal": lambda m, fm, x, y: ggn(fm, x, y).diagonal(),
        "GGN kfac": lambda m, fm, x, y: ggn(fm, x, y).kfac().to_dense(),
        "GGN matvec": lambda m, fm, x, y: ggn(fm, x, y).matvec(
            torch.linspace(-1, 1, fm.num_params, dtype=D)
        ),
        "GGN dense": lambda m, fm, x, y: ggn(fm, x, y).dense(),
        "GGN lowrank": lambda m, fm, x, y: ggn(fm, x, y).lowrank(3),
        "EmpiricalFisher diagonal": lambda m, fm, x, y: EmpiricalFisher(
            fm, [(x, y)], "classification"
        ).diagonal(),
        "laplace_posterior": lambda m, fm, x, y: laplace_posterior(
            ggn(fm, x, y).diagonal(), 1.0, layout=fm
        ).diagonal(),
        "log_marginal_likelihood": lambda m, fm, x, y: _marginal_likelihood(ggn(fm, x, y)),
        "save and load": lambda m, fm, x, y: _saved_and_loaded(
            laplace_posterior(ggn(fm, x, y).kfac(), 1.0), fm
        ),
    }


def _marginal_likelihood(op) -> torch.Tensor:
    return log_marginal_likelihood(op, op.diagonal(), 1.0)


def _saved_and_loaded(cov, fm) -> torch.Tensor:
    buffer = io.BytesIO()
    pf.save(cov, buffer)
    buffer.seek(0)
    return pf.load(buffer, model=fm).to_dense()


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flat(r)]
    return [t for t in vars(result).values() if isinstance(t, torch.Tensor)]


def _snapshot(model: nn.Module):
    return (
        {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        [m.training for m in model.modules()],
    )


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    params, buffers, modes = snapshot
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (p, value, grad) in params.items():
        assert now[n] is p and type(p) is nn.Parameter, n
        assert torch.equal(p.detach(), value) and p.requires_grad == grad and p.grad is None, n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert [m.training for m in model.modules()] == modes


def _stress(kind: str, jobs: dict[str, Job], threads: int, same_model: bool) -> None:
    models = _models(kind)
    fms = [pf.FunctionalModel(m) for m in models]
    data = [_data(i) for i in range(len(models))]
    names = sorted(jobs)
    reference = {
        (i, name): _flat(jobs[name](models[i], fms[i], *data[i]))
        for i in range(len(models))
        for name in names
    }
    snapshots = [_snapshot(m) for m in models]
    per_thread = CALLS_PER_CONFIGURATION // threads
    barrier, errors, checked = threading.Barrier(threads), [], [0]

    def work(t: int) -> None:
        barrier.wait()
        for r in range(per_thread):
            i = 0 if same_model else t % len(models)
            name = names[(t * 3 + r) % len(names)]
            try:
                got = _flat(jobs[name](models[i], fms[i], *data[i]))
                want = reference[(i, name)]
                assert len(got) == len(want), name
                for a, b in zip(got, want, strict=True):
                    assert a.shape == b.shape, name
                    scale = b.abs().max().clamp_min(1e-300) if b.numel() else 1.0
                    err = ((a - b).abs().max() / scale).item() if b.numel() else 0.0
                    assert err <= TOL, (name, err)
                checked[0] += 1
            except BaseException as err:  # reported by the main thread
                errors.append((t, name, repr(err)[:500]))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[:5]
    assert checked[0] == per_thread * threads == CALLS_PER_CONFIGURATION
    for model, snapshot in zip(models, snapshots, strict=True):
        _assert_unchanged(model, snapshot)


CONFIGURATIONS = [(2, True), (2, False), (4, True), (4, False)]
IDS = [
    "2 threads same model",
    "2 threads different models",
    "4 threads same model",
    "4 threads different models",
]


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(("threads", "same_model"), CONFIGURATIONS, ids=IDS)
def test_every_entry_point_from_several_threads(threads, same_model):
    _stress("residual", {**_functional_jobs(), **_curvature_jobs()}, threads, same_model)


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(("threads", "same_model"), CONFIGURATIONS, ids=IDS)
def test_curvature_of_sequential_mlps_from_several_threads(threads, same_model):
    """The hand-differentiated path of ``nn.Sequential`` MLPs."""
    _stress("sequential", _curvature_jobs(), threads, same_model)


def _more_jobs() -> dict[str, Job]:
    """The other public entry points, on plain ``nn.Sequential`` chains (whose repeated
    ``functional_variance`` calls replay a captured program) and on the traced path."""

    def cov(fm):
        return pf.Diagonal(torch.linspace(0.05, 0.2, fm.num_params, dtype=D))

    compiled: dict[int, object] = {}  # one compiled function per model, shared by the threads

    def compiled_call(fm, x):
        if id(fm) not in compiled:  # made by the single-threaded reference pass
            compiled[id(fm)] = pf.compile(fm, cov(fm), x)
        return compiled[id(fm)](x)

    def backend(m):
        laplace_interop = pytest.importorskip("pushforward.laplace_interop")
        return laplace_interop.PushforwardGGN(m, "classification")

    def evaluate(fm, x):
        from pushforward.distributed import evaluate

        return evaluate(fm, [x[:4], x[4:]], cov(fm))

    def prior(fm, x, y):
        op = GGN(fm, [(x, y)], "classification")
        return optimize_prior_precision(op, op.diagonal(), n_steps=5)

    return {
        "compile": lambda m, fm, x, y: compiled_call(fm, x),
        "monte_carlo_variance": lambda m, fm, x, y: pf.monte_carlo_variance(
            fm, x, cov(fm), 16, generator=torch.Generator().manual_seed(0)
        ),
        "optimize_prior_precision": lambda m, fm, x, y: prior(fm, x, y),
        "distributed.evaluate": lambda m, fm, x, y: evaluate(fm, x),
        "laplace backend diag": lambda m, fm, x, y: backend(m).diag(x, y),
        "laplace backend kron": lambda m, fm, x, y: [
            t for block in backend(m).kron(x, y, N=6)[1].kfacs for t in block
        ],
    }


@pytest.mark.usefixtures("quiet_fallbacks")
@pytest.mark.parametrize(("threads", "same_model"), CONFIGURATIONS, ids=IDS)
@pytest.mark.parametrize("kind", ["sequential", "residual"])
def test_the_other_entry_points_and_replays_from_several_threads(kind, threads, same_model):
    _stress(kind, {**_functional_jobs(), **_more_jobs()}, threads, same_model)

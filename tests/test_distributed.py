"""Data parallelism over torch.distributed: two gloo processes against one process, float64.

Two CPU processes (spawned once for every check; a file store, no port) each hold a replica of
a tiny classifier and a shard of 23 examples (``DistributedSampler``: 12 and 11, rank 1 padded
with a repeated example, shuffled). Every curvature result — diagonal GGN, K-FAC, a Lanczos
low-rank fit, the marginal likelihood, a mean-reduced empirical Fisher — and every gathered
result of :func:`pushforward.distributed.evaluate` — variances, joint samples with a fixed
generator, probit and Monte Carlo probabilities, a joint covariance across the ranks' examples
— must equal the single-process result on all 23 examples to 1e-10, on both ranks; the clear
errors must be raised on both ranks (no hang).
"""

from __future__ import annotations

import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pushforward as pf
from pushforward.curvature import GGN, EmpiricalFisher, log_marginal_likelihood
from pushforward.distributed import evaluate

DT = torch.float64
TOL = 1e-10
N, WORLD, BATCH = 23, 2, 4
#: The ranks are killed after this long (a hang in a collective must not hang the suite).
TIMEOUT_S = 120


def problem() -> tuple[nn.Module, TensorDataset, tuple[pf.CovarianceOperator, ...]]:
    """The model, the data and two covariances: a low rank (r = 4 < P: ``J L`` is gathered for
    a joint covariance) and a low rank plus a diagonal (r = 4 + P: ``J`` is)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (N,), generator=g)
    P = sum(p.numel() for p in model.parameters())
    U = torch.randn(P, 4, generator=g, dtype=DT) * 0.1
    S = pf.LowRank(U, torch.ones(4, dtype=DT))
    S_diag = pf.LowRank(U, torch.ones(4, dtype=DT), diag=torch.full((P,), 1e-2, dtype=DT))
    return model, TensorDataset(X, y), (S, S_diag)


def results(loader: DataLoader, model: nn.Module, covs) -> dict[str, torch.Tensor]:
    """Everything compared, for ``loader`` (sharded or not)."""
    S, S_diag = covs
    ggn = GGN(model, loader)
    diag = ggn.diagonal()
    kfac = ggn.kfac()
    out = {"diag": diag, "kfac": kfac.to_dense()}
    for name in ("0.weight", "2.weight"):  # the factors themselves, not only their products
        block = kfac.factors(name)
        out[f"kfac_{name}_out"], out[f"kfac_{name}_in"] = block.out_factor, block.in_factor
    values, vectors = ggn.lowrank(3, iterations=12)
    out["lanczos_values"] = values
    out["lanczos_projector"] = vectors @ vectors.T
    out["marglik"] = log_marginal_likelihood(ggn, diag, torch.tensor(0.5, dtype=DT))
    out["ef_mean_diag"] = EmpiricalFisher(model, loader, reduction="mean").diagonal()
    out["n_data"] = torch.tensor(ggn.n_data)
    if isinstance(loader.sampler, DistributedSampler):
        gathered = lambda what, cov=S, **kw: evaluate(model, loader, cov, what, **kw)  # noqa: E731
    else:  # the reference: one call on all the examples
        x = loader.dataset.tensors[0]
        table = {
            "variance": pf.functional_variance,
            "samples": pf.functional_samples,
            "predictive": pf.predictive,
            "covariance": pf.functional_covariance,
        }
        gathered = lambda what, cov=S, **kw: table[what](model, x, cov, **kw)  # noqa: E731
    out["f"], out["variance"] = gathered("variance")
    g = torch.Generator().manual_seed(7)
    out["samples"] = gathered("samples", n_samples=5, generator=g)
    out["samples_again"] = gathered("samples", n_samples=5, generator=g)  # g was advanced
    out["probit"] = gathered("predictive", link="probit")
    out["mc"] = gathered(
        "predictive", link="mc", n_samples=6, generator=torch.Generator().manual_seed(3)
    )
    out["joint_f"], out["joint"] = gathered("covariance", joint=True)
    out["joint_diag"] = gathered("covariance", cov=S_diag, joint=True)[1]
    return out


def errors(model: nn.Module, dataset: TensorDataset, covs, early: GGN) -> dict[str, str]:
    """The clear errors, by name: the exception's type and message."""
    S = covs[0]
    found = {}
    plain = DataLoader(dataset, batch_size=BATCH)
    sharded = DataLoader(dataset, batch_size=BATCH, sampler=DistributedSampler(dataset))
    checks = {
        "ggn_plain_loader": lambda: GGN(model, plain),
        "ggn_made_before_init": early.diagonal,
        "evaluate_plain_loader": lambda: evaluate(model, plain, S),
        "samples_without_generator": lambda: evaluate(model, sharded, S, "samples", n_samples=2),
        "joint_over_budget": lambda: evaluate(
            model, sharded, S, "covariance", joint=True, memory_budget="30KB"
        ),
    }
    for name, check in checks.items():
        try:
            check()
        except (ValueError, RuntimeError) as err:  # MemoryBudgetError is a ValueError
            found[name] = f"{type(err).__name__}: {err}"
    return found


def _worker(rank: int, store: str, folder: str) -> None:
    try:
        torch.set_num_threads(1)
        model, dataset, S = problem()
        # made before torch.distributed starts: "auto" resolved to a local computation
        early = GGN(model, [dataset[:4]])
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        sampler = DistributedSampler(dataset, shuffle=True, seed=3)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
        out = results(loader, model, S)
        # this rank's own data only (process_group=None): its shard, padding left out
        local = GGN(model, loader, process_group=None)
        out["local_n_data"] = torch.tensor(local.n_data)
        # Monte Carlo draws differ from one process's (seeded per batch), but not between ranks
        out["mc_diag"] = GGN(model, loader, mc_samples=2).diagonal()
        found = errors(model, dataset, S, early)
        torch.save({"results": out, "errors": found}, f"{folder}/{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        with open(f"{folder}/{rank}.err", "w") as fh:
            fh.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    model, dataset, S = problem()
    return results(DataLoader(dataset, batch_size=7), model, S)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, reference) -> list[dict]:
    """Both ranks' results. The processes are forked after the reference ran here: they start
    with torch and every lazily imported module loaded (spawned ones import them again, which
    takes most of a minute on a busy machine)."""
    folder = tmp_path_factory.mktemp("distributed")
    args = (str(folder / "store"), str(folder))
    context = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a collective hang?)")
    return [torch.load(folder / f"{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_rank_equals_one_process(ranks, reference):
    for rank, found in enumerate(ranks):
        for name, want in reference.items():
            got = found["results"][name]
            assert got.shape == want.shape, (rank, name)
            scale = want.abs().max().clamp_min(1.0)
            assert ((got - want).abs().max() / scale).item() < TOL, (rank, name)


def test_shards_and_padding(ranks, reference):
    assert int(reference["n_data"]) == N
    assert [int(r["results"]["local_n_data"]) for r in ranks] == [12, 11]
    # the second draw with the advanced generator differs from the first
    assert not torch.allclose(reference["samples"], reference["samples_again"])


def test_monte_carlo_curvature_is_the_same_on_every_rank(ranks):
    first, second = (r["results"]["mc_diag"] for r in ranks)
    assert torch.equal(first, second) and first.abs().sum() > 0


def test_clear_errors_on_every_rank(ranks):
    for found in ranks:
        errs = found["errors"]
        assert "without a DistributedSampler" in errs["ggn_plain_loader"]
        assert "initialized after this object" in errs["ggn_made_before_init"]
        assert "needs a DataLoader with a DistributedSampler" in errs["evaluate_plain_loader"]
        assert "need generator=" in errs["samples_without_generator"]
        assert errs["joint_over_budget"].startswith("MemoryBudgetError")
        assert "joint covariance across 23 examples" in errs["joint_over_budget"]


def test_process_group_argument():
    with pytest.raises(ValueError, match="process_group must be"):
        GGN(nn.Linear(2, 2), [(torch.randn(3, 2), torch.tensor([0, 1, 0]))], process_group="all")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            GGN(nn.Linear(2, 2), [], process_group=object())


def test_evaluate_without_a_group():
    """One process: a plain loader in its order; a DistributedSampler's shard alone
    (process_group=None) without its padding, joint covariance included."""
    model, dataset, (S, _) = problem()
    X = dataset.tensors[0]
    f, var = evaluate(model, DataLoader(dataset, batch_size=5), S)
    f_all, var_all = pf.functional_variance(model, X, S)
    assert torch.allclose(var, var_all, rtol=1e-12, atol=0) and torch.allclose(f, f_all)
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=1, shuffle=False)
    shard = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    mine = X[1::WORLD]  # 11 examples; the sampler's 12th repeats example 0
    f, joint = evaluate(model, shard, S, "covariance", joint=True, process_group=None)
    _, want = pf.functional_covariance(model, mine, S, joint=True)
    assert joint.shape == (33, 33) and torch.allclose(joint, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(f, model(mine))

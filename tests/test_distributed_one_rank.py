"""A data loader that is wrong on one rank only: every rank raises the library's own ValueError
(the wrong rank naming its problem, the others saying another rank's data are refused) instead
of one rank raising alone while the others hang in a collective or see gloo's "connection
closed by peer". Two gloo processes (forked, a file store, no port) per case."""

from __future__ import annotations

import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pushforward.curvature import GGN
from pushforward.distributed import evaluate

DT = torch.float64
WORLD = 2
#: A rank waiting in a collective for a peer that raised alone fails after this long (gloo).
COLLECTIVE_TIMEOUT_S = 20
TIMEOUT_S = 90


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(11, 3, generator=g, dtype=DT), torch.randint(0, 3, (11,)))
    P = sum(p.numel() for p in model.parameters())
    return model, data, torch.full((P,), 0.1, dtype=DT)


def _loader(data, rank: int, wrong: str | None) -> DataLoader:
    """Rank ``rank``'s loader; ``wrong``: what is wrong with it."""
    kwargs = {"num_replicas": WORLD, "rank": rank, "shuffle": True, "seed": 3}
    if wrong == "unsharded":
        return DataLoader(data, batch_size=4)
    if wrong == "wrong rank":
        kwargs["rank"] = 1 - rank
    if wrong == "other seed":
        kwargs["seed"] = 4
    if wrong == "drop last":
        kwargs["drop_last"] = True
    if wrong == "other data set":
        data = TensorDataset(*(t[:9] for t in data.tensors))
    return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, **kwargs))


def _worker(rank: int, store: str, folder: str, call: str, wrong: str) -> None:
    try:
        torch.set_num_threads(1)
        from pushforward import Diagonal

        model, data, var = _problem()
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        loader = _loader(data, rank, wrong if rank == 1 else None)
        try:
            if call == "GGN":
                GGN(model, loader).diagonal()
            else:
                evaluate(model, loader, Diagonal(var))
            found = "no error"
        except Exception as err:
            found = f"{type(err).__name__}: {err}"
        with open(f"{folder}/{rank}.txt", "w") as fh:
            fh.write(found)
        dist.destroy_process_group()
    except Exception:
        with open(f"{folder}/{rank}.err", "w") as fh:
            fh.write(traceback.format_exc())
        raise


def _run(tmp_path, call: str, wrong: str) -> list[str]:
    args = (str(tmp_path / "store"), str(tmp_path), call, wrong)
    context = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=0.2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a collective hang?)")
    return [(tmp_path / f"{r}.txt").read_text() for r in range(WORLD)]


#: What the wrong rank's error says, by case.
CASES = {
    ("GGN", "unsharded"): "without a DistributedSampler",
    ("GGN", "wrong rank"): "shards for rank 0 of 2, but this process is rank 1",
    ("GGN", "other seed"): "seed 4",
    ("GGN", "other data set"): "9 examples",
    ("evaluate", "unsharded"): "needs a DataLoader with a DistributedSampler",
    ("evaluate", "wrong rank"): "shards for rank 0 of 2, but this process is rank 1",
    ("evaluate", "drop last"): "drop_last=True",
    ("evaluate", "other seed"): "seed 4",
    ("evaluate", "other data set"): "9 examples",
}


@pytest.mark.parametrize(("call", "wrong"), sorted(CASES), ids=[" ".join(c) for c in sorted(CASES)])
def test_a_sampler_wrong_on_one_rank_is_refused_on_every_rank(tmp_path, call, wrong):
    started = time.monotonic()
    good, bad = _run(tmp_path, call, wrong)
    assert time.monotonic() - started < COLLECTIVE_TIMEOUT_S  # no rank waited for a lost peer
    assert bad.startswith("ValueError") and CASES[call, wrong] in bad, bad
    assert good.startswith("ValueError") and "another rank" in good, good

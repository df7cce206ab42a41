"""Data parallelism: curvature over 4,096 points on one process against two (``torch.distributed``).

* ``dist-diag`` — the exact diagonal GGN (softmax cross-entropy, summed) of the W1 MLP
  (784-256-256-10, random weights) over 4,096 seeded points in batches of 256;
* ``dist-kfac`` — its K-FAC (type-2, ``"expand"``);

each by ``GGN(model, loader)`` in 1 and in 2 rank processes (gloo, one torch thread each; a
``DistributedSampler`` gives each rank 2,048 points), so the speed-up is the ratio of the two
cases' times. The setup starts the rank processes (spawned: their imports and data are not
timed), and each timed call asks every rank for one more pass and waits for all of them: the
time is the slowest rank's pass plus a pipe round trip. The ranks' memory is in their own
processes, not in the measured peak (``info["rank_peak_rss_bytes"]``).

The setup makes a warm-up pass, then one that reports per rank its wall-clock and CPU seconds
(``info["pass_s"]``, ``info["pass_cpu_s"]``: on a machine other jobs keep busy, the CPU seconds
show how the work splits when the wall clock cannot), the seconds spent inside
``torch.distributed`` collectives (``info["comm_s"]``: the all-reduce of the result and its
layout check, waiting for the slower rank included) and the seconds of one all-reduce of the
result's size after a barrier (``info["allreduce_s"]``: the transfer alone).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register

from cases import workloads

#: Points, mini-batch size.
N_POINTS, BATCH = 4096, 256

TITLES = {
    "dist-diag": "Data parallel: exact diagonal GGN, MLP 784-256-256-10, 4,096 points, 1 vs 2 "
    "processes (1 thread each)",
    "dist-kfac": "Data parallel: K-FAC (type-2, expand), MLP 784-256-256-10, 4,096 points, 1 vs 2 "
    "processes (1 thread each)",
}
for _key, _title in TITLES.items():
    workloads.TITLES.setdefault(_key, _title)


def _data(quick: bool, seed: int):
    """``(model, dataset)``: the W1 MLP and the seeded points (the same in every rank)."""
    from torch.utils.data import TensorDataset

    hidden, points = (16, N_POINTS // 16) if quick else (256, N_POINTS)
    torch.manual_seed(seed)
    model = workloads.mlp(hidden, 10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(points, 784, generator=g)
    y = torch.randint(10, (points,), generator=g)
    return model, TensorDataset(X, y)


class _CollectiveTimer:
    """Seconds spent inside ``torch.distributed``'s collectives (patched in this process), and
    the largest tensor all-reduced."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "gather")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        self.largest = torch.zeros(0)
        for name in self.NAMES:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            tensor = args[0] if args else None
            if fn.__name__ == "all_reduce" and tensor.numel() > self.largest.numel():
                self.largest = torch.zeros_like(tensor)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _rank(rank: int, world: int, store: str, what: str, quick: bool, seed: int, conn) -> None:
    """One rank: build its shard, then run passes on request until told to stop."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from pushforward.curvature import GGN

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model, dataset = _data(quick, seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    ggn = GGN(model, DataLoader(dataset, batch_size=BATCH, sampler=sampler))
    compute = ggn.diagonal if what == "diag" else ggn.kfac
    timer = _CollectiveTimer()
    conn.send("ready")
    while (command := conn.recv()) != "stop":
        timer.seconds = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        compute()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        reply = {"s": seconds, "cpu_s": cpu, "comm_s": timer.seconds}
        if command == "measure" and world > 1:
            payload = timer.largest.clone()
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(payload)
            reply["allreduce_s"] = time.perf_counter() - start
        reply["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send(reply)
    if world > 1:
        dist.destroy_process_group()


def _setup(ctx: Context, what: str, world: int) -> Callable[[], object]:
    if ctx.device != "cpu":
        raise RuntimeError("the data-parallel cases run gloo processes on the CPU")
    spawn = multiprocessing.get_context("spawn")
    store = os.path.join(tempfile.mkdtemp(prefix="pf-dist-"), "store")
    pipes, procs = [], []
    for rank in range(world):
        mine, theirs = spawn.Pipe()
        args = (rank, world, store, what, ctx.quick, ctx.seed, theirs)
        proc = spawn.Process(target=_rank, args=args, daemon=True)
        proc.start()
        pipes.append(mine)
        procs.append(proc)
    for pipe in pipes:
        if pipe.recv() != "ready":
            raise RuntimeError("a rank process failed to start")

    def ask(command: str) -> list[dict]:
        for pipe in pipes:
            pipe.send(command)
        return [pipe.recv() for pipe in pipes]

    ask("pass")  # lazy imports and first-use work, the data cached on the ranks
    replies = ask("measure")
    ctx.info.update(
        arch="MLP 784-256-256-10" if not ctx.quick else "MLP 784-16-16-10",
        N=N_POINTS if not ctx.quick else N_POINTS // 16,
        B=BATCH,
        processes=world,
        threads_per_process=1,
        pass_s=[round(r["s"], 4) for r in replies],
        pass_cpu_s=[round(r["cpu_s"], 4) for r in replies],
        comm_s=[round(r["comm_s"], 4) for r in replies],
        allreduce_s=[round(r.get("allreduce_s", 0.0), 4) for r in replies],
        rank_peak_rss_bytes=[r["peak_rss_bytes"] for r in replies],
    )

    def run() -> list[dict]:
        return ask("pass")

    return run


_CASES = [
    (
        what,
        world,
        f"GGN(model, loader).{call}() over {world} rank process{'es' if world > 1 else ''}",
    )
    for what, call in (("diag", "diagonal"), ("kfac", "kfac"))
    for world in (1, 2)
]
for _what, _world, _method in _CASES:
    register(
        f"dist-{_what}/{_world}-process{'es' if _world > 1 else ''}",
        workload=f"dist-{_what}",
        method=_method,
        library="pushforward",
        tags=("distributed", "curvature"),
    )(partial(_setup, what=_what, world=_world))

"""Run one benchmark case in this (fresh) process and report to the parent over a pipe.

``python -m harness.worker <case-id> --events-fd N [--warmup W] [--repeats R]
[--quick] [--device D] [--threads T] [--seed S] [--module M ...]``

The worker writes one JSON object per line to file descriptor ``N``: ``started`` (after its
imports), ``setup_done``, then ``call_start``/``call_done`` for each of the ``W`` untimed
warm-up calls and the ``R`` timed calls, and ``finished`` — or ``failed`` with the phase,
``status`` (``"oom"`` or ``"error"``) and the error. The parent
(:mod:`harness.runner`) enforces the time and memory limits.

The warm-up calls absorb one-time costs (lazy imports, ``torch.func``'s first-use work,
allocator growth), which a laplace-torch case would otherwise already have paid in its fit and
the other cases not. They are measured like the timed calls and reported separately.

Measurement of one call (see :mod:`harness.procmem`): after ``gc.collect()`` and
``malloc_trim(0)`` (freed heap memory goes back to the system, so reusing it cannot hide a peak) the
baseline is the RSS right before the call — imports, model, inputs and the fitted posterior
are in it, and setup's own peak is not, because the kernel's high-water mark is reset there.
The peak is the largest of the reset high-water mark, a grown ``ru_maxrss`` and a 2 ms RSS
sampling thread. On CUDA the device memory is measured as well:
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, above
``memory_allocated()`` right before the call. Time is wall-clock ``perf_counter`` around the
call (after ``torch.cuda.synchronize()`` on CUDA); the call's result is released after it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import torch

from harness.procmem import (
    RssSampler,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
    ru_maxrss_bytes,
)
from harness.registry import Context, load_cases

__all__ = ["describe_error", "main", "measure_call"]


def measure_call(run: Callable[[], object], cuda: bool) -> dict[str, Any]:
    """Time one call of ``run`` and measure its peak memory above the RSS right before it."""
    gc.collect()
    release_free_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = rss_bytes()
    exact = reset_peak_rss()
    ru_before = ru_maxrss_bytes()
    # The kernel's high-water mark, when it can be reset, is exact and costs nothing during the
    # call; a sampling thread would take the GIL every few ms and slow Python-bound calls.
    sampler = None if exact else RssSampler()
    with sampler or contextlib.nullcontext():
        start = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    del out
    peaks = [peak_rss_bytes()] if exact else [sampler.max_bytes]
    if ru_maxrss_bytes() > ru_before:
        peaks.append(ru_maxrss_bytes())
    result: dict[str, Any] = {
        "time_s": elapsed,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": max(peaks),
        "sampled_peak_rss_bytes": None if sampler is None else sampler.max_bytes,
        "peak_exact": exact,
    }
    if cuda:
        result["cuda_before_bytes"] = cuda_before
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def describe_error(err: BaseException) -> dict[str, str]:
    """``status`` ("oom" for failed allocations, else "error"), a one-line ``message`` and the
    ``traceback``."""
    text = str(err)
    oom = isinstance(err, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("can't allocate memory", "out of memory")
    )
    first = text.strip().splitlines()[0] if text.strip() else ""
    return {
        "status": "oom" if oom else "error",
        "message": f"{type(err).__name__}: {first}"[:300],
        "traceback": traceback.format_exc()[-4000:],
    }


def _volunteer_for_oom_killer() -> None:
    """Make the kernel's OOM killer pick this process first if the machine runs out of memory."""
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass


def _emit(stream: TextIO, event: str, **fields: Any) -> None:
    stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Run the case named on the command line; 0 when every call finished, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--module", action="append", default=[])
    args = parser.parse_args(argv)

    _volunteer_for_oom_killer()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with os.fdopen(args.events_fd, "w") as events:
        _emit(events, "started", rss_bytes=rss_bytes())
        ctx = Context(quick=args.quick, device=args.device, seed=args.seed)
        start = time.perf_counter()
        try:
            case = load_cases(args.module)[args.case]
            run = case.setup(ctx)
        except Exception as err:
            _emit(events, "failed", phase="setup", info=ctx.info, **describe_error(err))
            return 1
        _emit(
            events,
            "setup_done",
            setup_s=time.perf_counter() - start,
            setup_peak_rss_bytes=ru_maxrss_bytes(),
            info=ctx.info,
            torch_threads=torch.get_num_threads(),
        )
        cuda = torch.device(args.device).type == "cuda"
        labels = [f"warm-up {i + 1}" for i in range(args.warmup)]
        labels += [f"call {i + 1}" for i in range(args.repeats)]
        for label in labels:
            _emit(events, "call_start", call=label)
            try:
                measured = measure_call(run, cuda)
            except Exception as err:
                _emit(events, "failed", phase=label, **describe_error(err))
                return 1
            _emit(events, "call_done", call=label, warmup=label.startswith("warm-up"), **measured)
        _emit(events, "finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

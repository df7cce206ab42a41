"""The C heap's thresholds (``pushforward.core.heap``): after a first computation, the megabyte
buffers a data pass frees and allocates again come from the heap, without page faults; with
``settings(settle_heap=False)`` the allocator is left as it was (and they are faulted in again).

Each case runs in a fresh interpreter: glibc's thresholds are per process and only ever rise.
"""

from __future__ import annotations

import ctypes.util
import json
import statistics
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's dynamic heap thresholds are a Linux C library's",
)

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    import pushforward as pf
    from pushforward.curvature import GGN

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).eval()
    x, y = torch.randn(1024, 784), torch.randint(10, (1024,))
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1024, 256)]
    with pf.settings(settle_heap=sys.argv[1] == "on"):
        ggn = GGN(model, data)
        ggn.kfac()  # the first call (traces, measured costs)

        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ggn.kfac()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        print(json.dumps([faults() for _ in range(6)]))
    """
)


def _page_faults(setting: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, setting], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_data_pass_reuses_its_buffers_after_a_first_call():
    # K-FAC of the GGN of an MLP 784-256-256-10 over 4 batches of 256: about 10 MB of rows and
    # factors per batch, formed and freed batch after batch
    untouched = _page_faults("off")
    if statistics.median(untouched[2:]) < 1000:
        pytest.skip(f"this C library keeps freed blocks already (page faults per call {untouched})")
    settled = _page_faults("on")
    # the heap may still grow to the pass's size in the first calls; then next to nothing is
    # faulted in. Medians over four calls: now and then a call still finds its megabytes split
    # among the heap's free blocks and grows it by one or two (a few hundred faults, in a few
    # percent of the calls of either code), and the kernel may reclaim a few idle pages
    assert statistics.median(settled[2:]) < statistics.median(untouched[2:]) / 10, (
        settled,
        untouched,
    )

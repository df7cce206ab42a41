"""The C heap's thresholds (``pushforward.core.heap``): after a first computation, megabyte-sized
buffers freed and allocated again come from the heap, without page faults; with
``settings(settle_heap=False)`` the allocator is left as it was.

Each case runs in a fresh interpreter: glibc's thresholds are per process and only ever rise.
"""

from __future__ import annotations

import ctypes.util
import json
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

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    cov = pf.Diagonal(torch.ones(sum(p.numel() for p in model.parameters())))
    with pf.settings(settle_heap=sys.argv[1] == "on"):
        pf.functional_variance(model, torch.randn(5, 3), cov)

    def faults():
        # what a data pass does per batch: a dozen 1 MiB buffers formed, used, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.ones(2**18) for _ in range(12)]
        del held
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    print(json.dumps([faults() for _ in range(4)]))
    """
)


def _page_faults(setting: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, setting], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_are_reused_after_a_first_call():
    untouched = _page_faults("off")
    pages = 12 * 2**20 // 4096
    if min(untouched[1:]) < pages // 2:
        pytest.skip(
            f"this C library keeps freed blocks already (page faults per round {untouched})"
        )
    settled = _page_faults("on")
    # the first round faults its pages in; later rounds reuse them (a few stray pages at most)
    assert max(settled[1:]) < pages // 4, (settled, untouched)

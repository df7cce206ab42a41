"""Per-call host work and the LLM passes as multiples of a forward (CPU, one thread).

* ``host-call`` — an MLP 6-50-50-1 (tanh, P = 2,951) with a laplace-torch ``KronLaplace``
  fitted on 40 points, B = 10 inputs: 100 calls per measured call of
  ``pf.functional_variance`` on the posterior from ``pf.from_laplace`` (repeated calls replay
  the captured chain program), of ``pf.compile``'s callable, and of laplace-torch's own
  ``la(x, pred_type="glm")``. The time per call is the measured time / 100.
* ``llm-ratio`` — GPT-2-small dimensions with LoRA r = 8 on ``c_attn`` (as ``llm-lora``) at
  B = 4 x T = 64 padded, default settings: the forward of the batch, the exact variance of 4
  answer logits at each row's last non-pad token, and their 4 x 4 covariance per example; each
  pass's time divided by the forward's is the figure to read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness.registry import Context, register
from torch import nn

from cases import llm_lora, workloads

#: Calls per measured call of the host-call cases.
CALLS = 100
#: The llm-ratio workload's sequence length.
TOKENS = 64

workloads.TITLES.setdefault(
    "host-call",
    f"Host work per call: MLP 6-50-50-1, laplace-torch KronLaplace, B=10 ({CALLS} calls)",
)
workloads.TITLES.setdefault(
    "llm-ratio",
    f"GPT-2-small + LoRA r=8, B=4 x T={TOKENS}: passes as multiples of a forward",
)


def _laplace_mlp(ctx: Context):
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(ctx.seed)
    net = nn.Sequential(nn.Linear(6, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    X, y = torch.rand(40, 6), torch.randn(40, 1)
    la = Laplace(net, "regression", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=20))
    x = torch.rand(10, 6, generator=torch.Generator().manual_seed(ctx.seed + 1))
    ctx.info.update({"B": 10, "calls": CALLS, "P": sum(p.numel() for p in net.parameters())})
    return la, x


def _host_call(ctx: Context, library: str) -> Callable[[], object]:
    import pushforward as pf

    la, x = _laplace_mlp(ctx)
    if library == "laplace-torch":
        call = lambda: la(x, pred_type="glm")  # noqa: E731
    else:
        fm, cov = pf.from_laplace(la)
        if library == "compiled":
            compiled = pf.compile(fm, cov, x)
            call = lambda: compiled(x)  # noqa: E731
        else:
            call = lambda: pf.functional_variance(fm, x, cov)  # noqa: E731

    def run() -> None:
        for _ in range(CALLS):
            call()

    return run


for _name, _library, _method, _tags in (
    ("pushforward-variance", "pushforward", "pf.functional_variance (repeated: replayed)", ()),
    ("pushforward-compiled", "compiled", "pf.compile(fm, S, x), then its callable", ()),
    ("laplace-glm", "laplace-torch", "la(x, pred_type='glm')", ("anchor",)),
):
    register(
        f"host-call/{_name}",
        workload="host-call",
        method=f"{CALLS} x {_method}",
        library="laplace-torch" if _library == "laplace-torch" else "pushforward",
        tags=_tags,
    )(lambda ctx, library=_library: _host_call(ctx, library))


def _llm_ratio(ctx: Context, what: str) -> Callable[[], object]:
    import pushforward as pf

    size = llm_lora.QUICK if ctx.quick else llm_lora.SIZE
    saved = size["tokens"]
    size["tokens"] = size["tokens"] if ctx.quick else TOKENS
    try:
        fm, batch, S = llm_lora._setup(ctx, llm_lora.LastToken)
    finally:
        size["tokens"] = saved
    B = batch["input_ids"].shape[0]
    outputs = torch.arange(10, 10 + llm_lora.SELECTED, device=ctx.device).expand(B, -1)

    def run() -> object:
        if what == "forward":
            with torch.no_grad():
                return fm(batch)
        if what == "variance":
            return pf.functional_variance(fm, batch, S, outputs=outputs)[1]
        return pf.functional_covariance(fm, batch, S, outputs=outputs)[1]

    return run


for _what, _method in (
    ("forward", "the model's forward of the batch (no gradients)"),
    ("variance", "pf.functional_variance(outputs=4 answer ids), default settings"),
    ("covariance", "pf.functional_covariance(outputs=4 answer ids), 4 x 4 per example"),
):
    register(
        f"llm-ratio/{_what}",
        workload="llm-ratio",
        method=_method,
        library="torch" if _what == "forward" else "pushforward",
        tags=("llm",),
    )(lambda ctx, what=_what: _llm_ratio(ctx, what))

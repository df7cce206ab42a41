"""The one-line laplace-torch paths: predicting with ``glm_predictive(la, x)`` and fitting with
``backend=PushforwardGGN``.

* ``w1-diag``/``w1-kron`` ``pushforward-laplace-oneline``: ``glm_predictive(la, x,
  link_approx="probit")`` — the probabilities ``la(x, pred_type="glm")`` returns — on the same
  fitted laplace-torch object as the anchors (``workloads.fit_laplace``), so their ratio to
  ``laplace-default`` is the W1 ratio as a user gets it by changing one line. The posterior is
  converted in the setup (the conversion is cached per object); the anchors time
  laplace-torch's mean and K x K covariance, without the link.
* ``fit-diag``: ``Laplace(model, "classification", subset_of_weights="all",
  hessian_structure="diag").fit(loader)`` on an MLP 784-256-256-100 with 512 points in
  mini-batches of 256: ``laplace-default`` (CurvlinopsGGN, whose diagonal GGN contracts the
  batch's explicit Jacobian, 256 x 100 x 292,452 floats = 30 GB: expected to stop at the
  memory limit, which the runner records as out of memory) and ``pushforward-backend``
  (``backend=PushforwardGGN`` with a 128 MB working-memory budget). Only ``fit`` is timed;
  model, data and the unfitted Laplace object are built in the setup.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register

from cases import workloads

#: ``fit-diag`` at full size: classes, hidden width, training points, mini-batch size.
FIT_CLASSES, FIT_HIDDEN, FIT_POINTS, FIT_BATCH = 100, 256, 512, 256
FIT_MEMORY_BUDGET = "128MB"


def _oneline_predictive(ctx: Context, key: str) -> Callable[[], object]:
    from pushforward.laplace_interop import glm_predictive

    w = workloads.build(ctx, key)
    la = workloads.fit_laplace(ctx, w)
    glm_predictive(la, w.x[:1], link_approx="probit")  # converts the posterior (cached)
    return partial(glm_predictive, la, w.x, link_approx="probit")


for _key in ("w1-diag", "w1-kron"):
    register(
        f"{_key}/pushforward-laplace-oneline",
        workload=_key,
        method="pushforward.laplace_interop.glm_predictive(la, x, link_approx='probit') on the "
        "anchors' fitted laplace-torch object (what la(x, pred_type='glm') returns)",
        library="pushforward",
    )(partial(_oneline_predictive, key=_key))


def _fit_diag(ctx: Context, backend: str) -> Callable[[], object]:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    classes = min(FIT_CLASSES, 50) if ctx.quick else FIT_CLASSES
    hidden = 16 if ctx.quick else FIT_HIDDEN
    points, batch = (FIT_POINTS // 8, FIT_BATCH // 8) if ctx.quick else (FIT_POINTS, FIT_BATCH)
    torch.manual_seed(ctx.seed)
    model = workloads.mlp(hidden, classes).to(ctx.device)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    X = torch.randn(points, 784, generator=g).to(ctx.device)
    y = torch.randint(classes, (points,), generator=g).to(ctx.device)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch)
    kwargs = {}
    if backend == "pushforward":
        from pushforward.laplace_interop import PushforwardGGN

        kwargs = {"backend": PushforwardGGN, "backend_kwargs": {"memory_budget": FIT_MEMORY_BUDGET}}
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="diag", **kwargs
    )
    ctx.info.update(
        arch=f"MLP 784-{hidden}-{hidden}-{classes}",
        N=points,
        B=batch,
        K=classes,
        P=sum(p.numel() for p in model.parameters()),
        laplace=type(la).__name__,
        backend=type(la.backend).__name__,
    )
    return partial(la.fit, loader)


register(
    "fit-diag/laplace-default",
    workload="fit-diag",
    method="laplace-torch DiagLaplace.fit, default backend (CurvlinopsGGN: explicit batch "
    "Jacobian B x K x P)",
    library="laplace-torch",
    tags=("anchor",),
)(partial(_fit_diag, backend="default"))
register(
    "fit-diag/pushforward-backend",
    workload="fit-diag",
    method=f"laplace-torch DiagLaplace.fit with backend=PushforwardGGN "
    f"(memory_budget={FIT_MEMORY_BUDGET!r})",
    library="pushforward",
)(partial(_fit_diag, backend="pushforward"))

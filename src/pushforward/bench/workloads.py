"""The benchmark workloads: seeded models and inputs, fitted laplace-torch posteriors, and
random diagonal weight-space covariances.

Weights and inputs are random (seeded, float32): the cost of the products does not depend on
their values. ``quick`` mode keeps the architectures but shrinks them (hidden width 16, CNN
channels 4 and 8, at most 50 classes) and divides every batch size by 8, to check the harness in
seconds; its numbers are not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pushforward.bench.registry import Context

__all__ = [
    "JACOBIAN_BATCHES",
    "LAPLACE_BACKENDS",
    "SCALING_BATCHES",
    "SPECS",
    "TITLES",
    "Workload",
    "build",
    "fit_laplace",
    "random_diagonal",
]


@dataclass(frozen=True)
class Spec:
    """Shape of a workload: ``arch`` ("mlp" or "cnn"), number of classes, batch size (None for a
    batch-size sweep, where each case gives its own) and the posterior structure of the
    laplace-torch fits on it ("diag" or "kron")."""

    arch: str
    classes: int
    batch: int | None
    structure: str = "diag"


SPECS: dict[str, Spec] = {
    "w1-diag": Spec("mlp", 10, 256, "diag"),
    "w1-kron": Spec("mlp", 10, 256, "kron"),
    "w3-diag": Spec("mlp", 1000, 64, "diag"),
    "w4-diag": Spec("cnn", 10, 64, "diag"),
    "w5-samples": Spec("mlp", 10, 256, "diag"),
    "scaling-mlp": Spec("mlp", 10, None, "diag"),
    "jacobian-cnn": Spec("cnn", 10, None, "diag"),
}

#: Report section titles (full sizes).
TITLES: dict[str, str] = {
    "w1-diag": "W1: MLP 784-256-256-10 (P=269,322), B=256, diagonal posterior (DiagLaplace)",
    "w1-kron": "W1: MLP 784-256-256-10 (P=269,322), B=256, Kronecker posterior (KronLaplace)",
    "w3-diag": "W3: MLP 784-256-256-1000 (P=523,752), B=64, diagonal posterior",
    "w4-diag": "W4: CNN 1x28x28, two 3x3 convs (16, 32 channels) and a linear head (P=20,490), "
    "B=64, diagonal posterior",
    "w5-samples": "W5: 100 linearized function samples vs 100 forward passes, "
    "MLP 784-256-256-10, B=256",
    "scaling-mlp": "Batch-size scaling: MLP 784-256-256-10, diagonal posterior",
    "jacobian-cnn": "Explicit per-example Jacobian (B, K, P): CNN of W4",
}

SCALING_BATCHES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
JACOBIAN_BATCHES: tuple[int, ...] = (8, 16, 32, 64)

#: laplace-torch curvature backends by short name (``None``: its default, CurvlinopsGGN).
LAPLACE_BACKENDS: dict[str, str | None] = {
    "default": None,
    "backpack": "BackPackGGN",
    "asdl": "AsdlGGN",
}

#: laplace-torch fits on ``2 * max(1, FIT_ROWS // K)`` synthetic points, in two mini-batches:
#: the predictive's cost does not depend on the fit data, and its default backend builds the
#: fit batch's explicit Jacobian (fit batch x K x P), so the fit batch shrinks as K grows.
FIT_ROWS = 160


@dataclass
class Workload:
    """A model in eval mode, its input batch ``x``, and facts the cases need."""

    key: str
    model: nn.Module
    x: Tensor
    classes: int
    structure: str

    def params(self) -> dict[str, Tensor]:
        """Detached parameters by name (``named_parameters()`` order)."""
        return {n: p.detach() for n, p in self.model.named_parameters()}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _mlp(hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def _cnn(c1: int, c2: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, classes),
    )


def build(ctx: Context, key: str, batch: int | None = None) -> Workload:
    """Build workload ``key`` of :data:`SPECS` on ``ctx.device`` (``batch`` for sweeps) and record
    its sizes in ``ctx.info``."""
    spec = SPECS[key]
    full_batch = spec.batch if batch is None else batch
    if full_batch is None:
        raise ValueError(f"workload {key!r} is a batch-size sweep: pass batch=")
    b = max(1, full_batch // 8) if ctx.quick else full_batch
    classes = min(spec.classes, 50) if ctx.quick else spec.classes
    torch.manual_seed(ctx.seed)
    if spec.arch == "mlp":
        hidden = 16 if ctx.quick else 256
        model, shape = _mlp(hidden, classes), (784,)
        arch = f"MLP 784-{hidden}-{hidden}-{classes}"
    else:
        c1, c2 = (4, 8) if ctx.quick else (16, 32)
        model, shape = _cnn(c1, c2, classes), (1, 28, 28)
        arch = f"CNN conv({c1})-pool-conv({c2})-pool-linear({classes})"
    model = model.to(ctx.device).eval()
    x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
    w = Workload(key, model, x, classes, spec.structure)
    ctx.info.update(arch=arch, B=b, K=classes, P=w.num_params)
    return w


def fit_laplace(ctx: Context, w: Workload, backend: str = "default"):
    """A laplace-torch ``Laplace(model, "classification", subset_of_weights="all",
    hessian_structure=w.structure)`` with curvature backend ``backend`` (a key of
    :data:`LAPLACE_BACKENDS`), fitted on a small synthetic set (see :data:`FIT_ROWS`)."""
    from laplace import Laplace, curvature
    from torch.utils.data import DataLoader, TensorDataset

    backend_cls = LAPLACE_BACKENDS[backend]
    kwargs = {} if backend_cls is None else {"backend": getattr(curvature, backend_cls)}
    fit_batch = max(1, FIT_ROWS // w.classes)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    X = torch.randn(2 * fit_batch, *w.x.shape[1:], generator=g).to(w.x.device)
    y = torch.randint(w.classes, (2 * fit_batch,), generator=g).to(w.x.device)
    la = Laplace(
        w.model, "classification", subset_of_weights="all", hessian_structure=w.structure, **kwargs
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=fit_batch))
    ctx.info.update(laplace=type(la).__name__, backend=type(la.backend).__name__, fit_points=len(X))
    return la


def random_diagonal(ctx: Context, w: Workload) -> dict[str, Tensor]:
    """A positive diagonal covariance S as ``{name: variances of the parameter's shape}``."""
    g = torch.Generator().manual_seed(ctx.seed + 2)
    return {
        n: (1e-2 * (0.5 + torch.rand(p.shape, generator=g))).to(p.device)
        for n, p in w.model.named_parameters()
    }

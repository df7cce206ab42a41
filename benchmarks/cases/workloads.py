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
from harness.registry import Context
from torch import Tensor, nn

__all__ = [
    "JACOBIAN_BATCHES",
    "LAPLACE_BACKENDS",
    "SCALING_BATCHES",
    "SPECS",
    "TITLES",
    "Workload",
    "build",
    "fit_laplace",
    "gpt2_lora",
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
    "w7-grad-x": Spec("mlp", 10, 32, "diag"),
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
    "w6-gpt2-lora": "W6: GPT-2 architecture (4 layers, d=256, vocab 50257, random init), LoRA r=8 "
    "on c_attn (32,768 parameters in the posterior), B=4, T=32: full-vocabulary MC predictive, "
    "100 samples",
    "fit-diag": "Fitting DiagLaplace: MLP 784-256-256-100 (P=292,452), 512 points in batches "
    "of 256 (laplace-torch's default backend builds each batch's (256, 100, P) Jacobian)",
    "w7-grad-x": "W7: gradient of the summed GLM variance w.r.t. the inputs x (Bayesian "
    "optimization), MLP 784-256-256-10, B=32, diagonal posterior",
    "estimate": "Memory estimate vs measured peak (the planner's plan on W1/W3/W4/W6)",
    "planner": "The planner's choice vs the fastest strategy, every exact strategy named",
    "overhead": "Per-call overhead with a cached plan: joint covariances within groups of 4, "
    "B=12, MLP 6-50-50-1 (P=2,851), Kronecker S",
    "joint-reverse": "Joint 512 x 512 covariance, MLP 6-200-200-1, Kronecker S: reverse rows "
    "(each row multiplied by S once) and the planner's choice",
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


def mlp(hidden: int, classes: int) -> nn.Module:
    """The W1-shaped MLP 784-hidden-hidden-classes (ReLU), freshly initialized."""
    return nn.Sequential(
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


class CustomMLP(nn.Module):
    """The W1-shaped MLP as a custom module (its own ``forward``), as most models reach the
    library: not an ``nn.Sequential``, so its chain is read from the autograd graph of each
    forward (the producer's traced chain).

    With ``general=True`` the first activation is multiplied by a buffer of ones: the same
    numbers, but no longer a chain of linear layers and activations, so it takes the general
    path every other model takes (one batched backward from probes on the layer outputs).
    """

    def __init__(self, hidden: int, classes: int, general: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.register_buffer("scale", torch.ones(hidden) if general else None)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.scale is not None:
            h = h * self.scale
        return self.head(torch.relu(self.fc2(h)))


def custom_mlp(sequential: nn.Sequential, general: bool = False) -> CustomMLP:
    """:class:`CustomMLP` with the weights of :func:`mlp`'s ``sequential``."""
    hidden, classes = sequential[0].out_features, sequential[4].out_features
    out = CustomMLP(hidden, classes, general).to(sequential[0].weight)
    for mine, theirs in zip(
        (out.fc1, out.fc2, out.head), (sequential[0], sequential[2], sequential[4]), strict=True
    ):
        mine.load_state_dict(theirs.state_dict())
    return out.train(sequential.training)


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
        model, shape = mlp(hidden, classes), (784,)
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


class LoRA(nn.Module):
    """``base(x) + (alpha / r) (x A^T) B^T`` around a frozen linear map (``nn.Linear`` or Hugging
    Face's ``Conv1D``, whose weight is stored ``(in, out)``)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        d_in, d_out = (
            (weight.shape[0], weight.shape[1])
            if type(base).__name__ == "Conv1D"
            else (
                weight.shape[1],
                weight.shape[0],
            )
        )
        g = torch.Generator().manual_seed(d_in * 7 + d_out)
        self.A = nn.Parameter(torch.randn(rank, d_in, generator=g) / d_in**0.5)
        self.B = nn.Parameter(0.01 * torch.randn(d_out, rank, generator=g))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T


def gpt2_lora(ctx: Context) -> tuple[nn.Module, Tensor]:
    """W6: a GPT-2-architecture language model (random weights from a config, no download) with
    every weight frozen and LoRA adapters (r=8) on each block's ``c_attn``; token ids (B, T)."""
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(ctx.seed)
    n_embd, vocab, layers, B, T = (32, 1000, 2, 2, 8) if ctx.quick else (256, 50257, 4, 4, 32)
    config = GPT2Config(
        n_layer=layers, n_embd=n_embd, n_head=4, vocab_size=vocab, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.requires_grad_(False)
    for block in model.transformer.h:
        block.attn.c_attn = LoRA(block.attn.c_attn)
    model = model.to(ctx.device).eval()
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(ctx.seed)).to(
        ctx.device
    )
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.info.update(
        arch=f"GPT-2 {layers}x{n_embd}, vocab {vocab}, LoRA r=8", B=B, T=T, K=vocab, P=P
    )
    return model, ids


def peft_gpt2(
    ctx: Context, layers: int, width: int, heads: int, vocab: int, tokens: int, rank: int
) -> nn.Module:
    """A GPT-2-architecture language model (random weights from a config, no download) with
    peft LoRA of rank ``rank`` on every block's ``c_attn``, in eval mode on ``ctx.device``."""
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(ctx.seed)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=max(1024, tokens),
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = LoraConfig(r=rank, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(GPT2LMHeadModel(config), lora).to(ctx.device).eval()


def random_diagonal(ctx: Context, w: Workload) -> dict[str, Tensor]:
    """A positive diagonal covariance S as ``{name: variances of the parameter's shape}``."""
    g = torch.Generator().manual_seed(ctx.seed + 2)
    return {
        n: (1e-2 * (0.5 + torch.rand(p.shape, generator=g))).to(p.device)
        for n, p in w.model.named_parameters()
    }

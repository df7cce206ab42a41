"""Laplace posteriors on real data: scikit-learn's handwritten digits under rotation.

The guide itself is ``docs/gallery/plot_digits.py`` (a page of the documentation's gallery,
run when the site is built): train a small CNN, fit diagonal, K-FAC, last-layer and low-rank
Laplace posteriors with :mod:`pushforward.curvature`, tune the prior precision by the marginal
likelihood, and measure accuracy, NLL, ECE and Brier score in distribution and on rotated test
digits, with laplace-torch's numbers for the same posteriors beside ours. This module holds what
the guide needs besides the library (data, model, training, rotations, metrics, laplace-torch's
side, the table and the figure) and runs the guide from the command line::

    python examples/digits.py                 # full size; writes examples/results/digits/
    python examples/digits.py --size ci       # the reduced size the docs build uses

It writes ``results.md`` (the table), ``results.json`` (every number) and ``reliability.png``.
The data ship inside scikit-learn (1,797 8x8 images): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "gallery" / "plot_digits.py"
RESULTS = ROOT / "examples" / "results" / "digits"


@dataclass(frozen=True)
class Size:
    """How much work the study does."""

    epochs: int
    angles: tuple[int, ...]
    rank: int
    laplace_torch: tuple[str, ...]  # the posteriors laplace-torch also fits


SIZES = {
    "full": Size(
        epochs=40,
        angles=tuple(range(0, 181, 15)),
        rank=50,
        laplace_torch=("diagonal", "K-FAC", "last-layer", "low-rank"),
    ),
    "ci": Size(epochs=20, angles=(0, 30, 60, 90), rank=20, laplace_torch=("K-FAC", "last-layer")),
}


def size_from_env() -> Size:
    """The size named by ``PUSHFORWARD_DOCS_SIZE`` (``ci`` unless set)."""
    name = os.environ.get("PUSHFORWARD_DOCS_SIZE", "ci")
    if name not in SIZES:
        raise ValueError(f"PUSHFORWARD_DOCS_SIZE must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


# -- data and model --------------------------------------------------------------------------
def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` in [0, 1], a stratified
    75/25 split of the 1,797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        range(len(y)), test_size=0.25, stratify=digits.target, random_state=seed
    )
    return x[train], y[train], x[test], y[test]


def make_cnn() -> nn.Sequential:
    """Two 3x3 convolutions with max-pooling and a two-layer head (P = 13,706)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train_map(model: nn.Module, loader: DataLoader, epochs: int, weight_decay: float) -> nn.Module:
    """Adam on the cross-entropy with weight decay (the MAP estimate); returns the model in
    eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate ``(N, 1, H, W)`` images about their centre (bilinear, zero outside)."""
    if degrees == 0:
        return images
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# -- metrics ---------------------------------------------------------------------------------
def metrics(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE (top label, ``bins`` equal-width bins) and Brier score
    (``sum_k (p_k - 1[y = k])^2``, 0..2) of class probabilities ``(N, K)``."""
    probs = probs.double().clamp_min(1e-12)
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    which = torch.bucketize(confidence, edges[1:-1])
    ece = sum(
        (m.sum() / len(y)) * (correct[m].mean() - confidence[m].mean()).abs()
        for b in range(bins)
        if (m := which == b).any()
    )
    onehot = F.one_hot(y, probs.shape[-1]).double()
    return {
        "accuracy": correct.mean().item(),
        "nll": -probs.gather(1, y[:, None]).log().mean().item(),
        "ece": float(ece),
        "brier": (probs - onehot).square().sum(-1).mean().item(),
    }


def reliability(probs: Tensor, y: Tensor, bins: int = 10) -> tuple[list[float], list[float]]:
    """Mean confidence and accuracy per non-empty equal-width confidence bin."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).float()
    which = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1)[1:-1])
    conf, acc = [], []
    for b in range(bins):
        m = which == b
        if m.any():
            conf.append(confidence[m].mean().item())
            acc.append(correct[m].mean().item())
    return conf, acc


# -- laplace-torch on the same model and data ------------------------------------------------
#: laplace-torch's classes for the study's posteriors: (subset_of_weights, hessian_structure,
#: backend). laplace-torch 0.3's LowRankLaplace needs the asdfghjkl package for its eigenpairs;
#: without it, its low-rank row uses this library's backend (laplace-torch's posterior and
#: predictive on our Lanczos eigenpairs).
LAPLACE_TORCH = {
    "diagonal": ("all", "diag", None),
    "K-FAC": ("all", "kron", None),
    "last-layer": ("last_layer", "full", None),
    "low-rank": ("all", "lowrank", "pushforward"),
}


def fit_laplace_torch(name: str, model: nn.Module, x: Tensor, y: Tensor, rank: int):
    """laplace-torch's posterior ``name`` fitted on ``(x, y)``, its scalar prior precision
    tuned by its marginal likelihood; returns ``(la, seconds)``. Batches of 32: its default
    backend's diagonal contracts each batch's explicit Jacobian, O(batch^2) to build."""
    from laplace import Laplace

    subset, structure, backend = LAPLACE_TORCH[name]
    kwargs = {}
    if backend == "pushforward":
        from pushforward.laplace_interop import PushforwardGGN

        kwargs = {"backend": PushforwardGGN, "backend_kwargs": {"low_rank": rank}}
    start = time.perf_counter()
    la = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure, **kwargs
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    la.optimize_prior_precision(
        pred_type="glm", method="marglik", prior_structure="scalar", link_approx="probit"
    )
    return la, time.perf_counter() - start


def predict_laplace_torch(la, x: Tensor, batch: int = 10) -> Tensor:
    """laplace-torch's GLM probit predictive, in small batches: its Jacobian (``jacrev`` over
    the batch's outputs) costs O(batch^2), so the total grows with the batch size."""
    return torch.cat(
        [
            la(x[i : i + batch], pred_type="glm", link_approx="probit")
            for i in range(0, len(x), batch)
        ]
    )


# -- report ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One method at one rotation: ours and, where laplace-torch computes it, its numbers."""

    method: str
    angle: int
    ours: dict[str, float]
    laplace_torch: dict[str, float] | None
    max_prob_diff: float | None


def table(rows: list[Row], angles: tuple[int, ...]) -> str:
    """The Markdown table: each method at each of ``angles``, laplace-torch beside ours."""
    head = (
        "| method | rotation | accuracy | NLL | ECE | Brier "
        "| laplace-torch: accuracy | NLL | ECE | Brier | max abs Δp |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.angle not in angles:
            continue
        ours = [f"{r.ours[k]:.3f}" for k in ("accuracy", "nll", "ece", "brier")]
        theirs = (
            [f"{r.laplace_torch[k]:.3f}" for k in ("accuracy", "nll", "ece", "brier")]
            if r.laplace_torch
            else ["—"] * 4
        )
        diff = "—" if r.max_prob_diff is None else f"{r.max_prob_diff:.1e}"
        lines.append(
            f"| {r.method} | {r.angle}° | {' | '.join(ours)} | {' | '.join(theirs)} | {diff} |"
        )
    return "\n".join(lines)


class Table:
    """The table as the gallery shows it: HTML in the page, Markdown as text."""

    def __init__(self, rows: list[Row], angles: tuple[int, ...]) -> None:
        self.markdown = table(rows, angles)

    def __repr__(self) -> str:
        return self.markdown

    def _repr_html_(self) -> str:
        lines = [line.strip("|").split("|") for line in self.markdown.splitlines()]
        head = "".join(f"<th>{c.strip()}</th>" for c in lines[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{c.strip()}</td>" for c in cells) + "</tr>"
            for cells in lines[2:]
        )
        return (
            f'<table class="pf-results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        )


def write_results(namespace: dict, out: Path, size_name: str) -> None:
    """Write what the guide computed: ``results.md``, ``results.json``, ``reliability.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = namespace["rows"]
    size: Size = namespace["size"]
    shown = tuple(a for a in (0, 30, 60, 90) if a in size.angles)
    text = "\n".join(
        [
            "# Digits under rotation: MAP and Laplace posteriors",
            "",
            f"Size `{size_name}`: {size.epochs} epochs, rotations {list(size.angles)}, "
            f"low rank {size.rank}; test set of {namespace['n_test']} digits; "
            f"prior precisions {namespace['deltas_text']} "
            f"(laplace-torch's: {namespace['theirs_deltas_text']}).",
            "",
            table(rows, shown),
            "",
        ]
    )
    (out / "results.md").write_text(text)
    payload = {
        "size": size_name,
        "settings": asdict(size),
        "prior_precision": namespace["deltas"],
        "prior_precision_laplace_torch": namespace["theirs_deltas"],
        "timings_s": namespace["timings"],
        "rows": [asdict(r) for r in rows],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    namespace["figure"].savefig(out / "reliability.png", dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ["PUSHFORWARD_DOCS_SIZE"] = args.size
    import matplotlib

    matplotlib.use("Agg")
    namespace = runpy.run_path(str(GUIDE), run_name="digits_guide")
    write_results(namespace, args.out, args.size)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()

"""The `make demo` job (`python examples/demo.py`): train, fit Laplace posteriors, predict, compare, plot.

Offline and seeded, on synthetic data, in one torch thread (:data:`THREADS`):

* a classifier (MLP 2-32-32-2, tanh) on two moons and a regressor (MLP 1-32-32-1, tanh) on
  ``y = sin(x) + noise`` with ``x`` in ``[-3, -1] ∪ [1, 3]`` (nothing in the gap between), each
  trained by full-batch Adam;
* diagonal and Kronecker Laplace posteriors over all weights, fitted by laplace-torch with this
  library's curvature backend :class:`~pushforward.laplace_interop.PushforwardGGN` (Kronecker:
  the KFAC it inherits from laplace-torch's default backend). The scalar prior precision
  maximizes laplace-torch's marginal likelihood (``la.optimize_prior_precision(method="marglik")``);
  the regressor's observation noise σ is the root of its training mean squared error, fixed
  (optimizing σ by marginal likelihood too, laplace-torch's regression recipe, drives it to
  about 2.4 with the diagonal posterior, whose log-determinant ignores the weights'
  correlations);
* the GLM predictive with this library (:func:`~pushforward.from_laplace` +
  :func:`~pushforward.api.predictive`; probit for the classifier, mean and variance + σ² for the
  regressor) on a grid over the moons and a line through the gap, and laplace-torch's own
  ``la(x, pred_type="glm", link_approx="probit")`` on the same fitted posterior, twice: with the
  Jacobians of its default backend (``CurvlinopsGGN``: ``torch.func.jacrev`` over the batch)
  and with those of the fitted ``PushforwardGGN`` backend.

The Kronecker posterior's regression band widens in the gap; the diagonal one's hardly does: a
factorized posterior drops the correlations that make "in-between" uncertainty (Foong et al.,
2019, "In-Between" Uncertainty in Bayesian Neural Networks), which the plot notes.

Written to the output directory: ``demo.png`` (regression band mean ± 2 sd and the moons'
predictive entropy, per posterior), ``results.md`` (the comparison table, also printed) and
``results.json`` (every number, among them the regression sd in the gap and on the data).

How the table measures: each predictive over the whole evaluation set (the grid, the line) is
called once untimed (warm-up; its result gives the max abs difference to this library's), then
``repeats`` times; time is the median wall-clock time, memory the largest peak resident memory
above the resident memory right before the call (:func:`harness.worker.measure_call`:
the kernel's high-water mark reset before the call), after freed heap memory is returned to the
system (``malloc_trim``) so that reused memory cannot hide a peak. laplace-torch is called in
batches of :data:`LAPLACE_BATCH` points, as with a ``DataLoader``: its default backend's
Jacobians cost memory quadratic in the batch size; this library gets the whole set at once and
chunks it within its memory budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness.report import format_seconds, machine_info
from harness.worker import measure_call

from pushforward.api.predictive import predictive
from pushforward.core.units import format_bytes
from pushforward.laplace_interop import PushforwardGGN, from_laplace

__all__ = [
    "FULL",
    "LAPLACE_BATCH",
    "METHODS",
    "QUICK",
    "STRUCTURES",
    "THREADS",
    "Config",
    "Data",
    "run_demo",
]

#: torch threads of the whole job: its models are too small for threads to pay, and on a machine
#: shared with other work (or with 2 cores) spinning threads make them many times slower.
THREADS = 1
#: Points per call of laplace-torch's predictive: the work and memory of its default backend's
#: Jacobians (``jacrev`` of the whole batch's output) grow quadratically with the batch size.
LAPLACE_BATCH = 256
STRUCTURES = ("diag", "kron")
STRUCTURE_NAMES = {"diag": "diagonal", "kron": "Kronecker"}
GAP = (-1.0, 1.0)
#: The regression sd "in the gap" is its mean over ``|x| <= GAP_CORE`` (the gap's middle half).
GAP_CORE = 0.5
DATA_RANGES = ((-3.0, -1.0), (1.0, 3.0))
LINE_RANGE = (-4.5, 4.5)
GRID_RANGE = ((-2.0, 3.0), (-1.5, 2.0))


@dataclass(frozen=True)
class Config:
    """Sizes of one demo run.

    Attributes:
        moons: two-moons training points.
        regression: regression training points (half on each side of the gap).
        width: hidden units of both MLPs (two hidden layers).
        steps: full-batch Adam steps of each training.
        grid: the classification grid is ``grid x grid`` points.
        line: points of the regression line.
        repeats: timed calls per predictive in the table.
    """

    moons: int
    regression: int
    width: int
    steps: int
    grid: int
    line: int
    repeats: int


FULL = Config(moons=200, regression=80, width=32, steps=1500, grid=64, line=400, repeats=3)
QUICK = Config(moons=100, regression=40, width=16, steps=400, grid=24, line=100, repeats=1)


# -- data and training ---------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """The demo's training sets: two moons ``(n, 2)`` with labels, and the gap regression."""

    moons_x: Tensor
    moons_y: Tensor
    reg_x: Tensor
    reg_y: Tensor


def two_moons(n: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points ``(n, 2)`` of two interleaved half circles with Gaussian noise, labels 0/1."""
    n0 = n // 2
    t = math.pi * torch.rand(n, generator=generator)
    upper = torch.stack([t[:n0].cos(), t[:n0].sin()], 1)
    lower = torch.stack([1 - t[n0:].cos(), 0.5 - t[n0:].sin()], 1)
    X = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=generator)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n - n0, dtype=torch.long)])
    return X, y


def gap_regression(n: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points ``x (n, 1)`` uniform on ``[-3, -1] ∪ [1, 3]``, ``y = sin(x) + noise``."""
    (a0, a1), (b0, b1) = DATA_RANGES
    u = torch.rand(n, generator=generator)
    x = torch.where(torch.arange(n) % 2 == 0, a0 + (a1 - a0) * u, b0 + (b1 - b0) * u)[:, None]
    return x, x.sin() + noise * torch.randn(n, 1, generator=generator)


def mlp(d_in: int, d_out: int, width: int) -> nn.Sequential:
    """Two tanh hidden layers of ``width`` units."""
    return nn.Sequential(
        nn.Linear(d_in, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, d_out),
    )


def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    name: str,
) -> float:
    """Full-batch Adam (learning rate 0.01) for ``steps`` steps under a progress bar titled
    ``train <name>``; the final training loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    bar = tqdm(range(steps), desc=f"train {name}")
    for _ in bar:
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        return loss_fn(model(X), y).item()


# -- Laplace fits --------------------------------------------------------------------------
#: laplace-torch warnings the demo's calls trigger that say nothing about them: the probit
#: reminder of ``optimize_prior_precision`` (marglik does not use a link) and a scalar
#: conversion inside the Kronecker log-determinant.
_LAPLACE_NOISE = (
    "By default `link_approx` is `probit`",
    "Converting a tensor with requires_grad=True to a scalar",
)


def fit_laplace(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    likelihood: str,
    structure: str,
    sigma_noise: float = 1.0,
) -> Any:
    """laplace-torch ``Laplace`` over all weights with ``hessian_structure=structure`` and this
    library's ``PushforwardGGN`` backend, fitted on ``(X, y)`` (one batch), with its scalar prior
    precision maximizing the marginal likelihood (``optimize_prior_precision(method="marglik")``).

    Args:
        sigma_noise: regression observation noise σ, kept fixed.
    """
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure=structure,
        sigma_noise=sigma_noise,
        backend=PushforwardGGN,
    )
    with warnings.catch_warnings():
        for message in _LAPLACE_NOISE:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        la.fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
        la.optimize_prior_precision(method="marglik")
    return la


# -- predictives ---------------------------------------------------------------------------
def pushforward_predictive(la: Any, x: Tensor) -> Tensor:
    """This library's GLM predictive of a fitted ``la`` at ``x``: class probabilities (probit)
    for classification, ``(mean, variance + σ²)`` stacked on the last dim for regression."""
    fm, cov = from_laplace(la)
    if la.likelihood == "classification":
        return predictive(fm, x, cov, likelihood="classification", link="probit")
    mean, var = predictive(
        fm, x, cov, likelihood="regression", noise_variance=la.sigma_noise.item() ** 2
    )
    return torch.cat([mean, var], -1)


def laplace_predictive(la: Any, x: Tensor) -> Tensor:
    """laplace-torch's own ``la(x, pred_type="glm", link_approx="probit")`` in batches of
    :data:`LAPLACE_BATCH`, laid out as :func:`pushforward_predictive`'s result."""
    parts = []
    for xb in x.split(LAPLACE_BATCH):
        if la.likelihood == "classification":
            parts.append(la(xb, pred_type="glm", link_approx="probit"))
        else:
            mean, var = la(xb, pred_type="glm", diagonal_output=True)
            parts.append(torch.cat([mean, var + la.sigma_noise.square()], -1))
    return torch.cat(parts)


@contextmanager
def default_backend_jacobians(la: Any) -> Iterator[None]:
    """Within the block ``la``'s predictive takes its Jacobians from laplace-torch's default
    backend (``CurvlinopsGGN``, ``torch.func.jacrev`` over the batch); the fitted posterior is
    untouched (laplace-torch builds its backend object lazily in ``la._backend``)."""
    from laplace.curvature import CurvlinopsGGN

    fitted = la._backend
    la._backend = CurvlinopsGGN(la.model, la.likelihood)
    try:
        yield
    finally:
        la._backend = fitted


# -- measurement ---------------------------------------------------------------------------
def measure(run: Callable[[], Tensor], repeats: int) -> tuple[Tensor, dict[str, Any]]:
    """``run()``'s result (from an untimed warm-up call) and statistics of ``repeats`` timed
    calls (:func:`harness.worker.measure_call`, each after ``gc.collect`` and
    returning the freed heap to the system): median time and the largest peak resident memory
    above the memory right before a call."""
    result = run()
    calls = []
    gc.freeze()  # the collection before each call then skips all objects alive now: fast
    try:
        for _ in range(repeats):
            calls.append(measure_call(run, cuda=False))
    finally:
        gc.unfreeze()
    times = [c["time_s"] for c in calls]
    stats = {
        "time_median_s": statistics.median(times),
        "times_s": times,
        "peak_above_baseline_bytes": max(
            c["peak_rss_bytes"] - c["rss_before_bytes"] for c in calls
        ),
        "peak_exact": all(c["peak_exact"] for c in calls),
    }
    return result, stats


METHODS = {
    "pushforward": "pushforward: from_laplace + predictive",
    "laplace-default": "laplace-torch la(x), default backend Jacobians (CurvlinopsGGN)",
    "laplace-pushforward": "laplace-torch la(x), fitted PushforwardGGN backend Jacobians",
}


def compare(la: Any, x: Tensor, repeats: int, label: str) -> tuple[Tensor, list[dict[str, Any]]]:
    """This library's predictive of ``la`` at ``x`` and one table row per method of
    :data:`METHODS` (:func:`measure`), under a progress bar titled with ``label``."""
    from tqdm.auto import tqdm

    with tqdm(total=len(METHODS), desc=f"predictives, {label}") as bar:
        ours, stats = measure(lambda: pushforward_predictive(la, x), repeats)
        rows = [{"method": "pushforward", **stats, "max_abs_diff": None}]
        bar.update()
        for method, backend in (
            ("laplace-default", default_backend_jacobians(la)),
            ("laplace-pushforward", nullcontext()),
        ):
            with backend:
                theirs, stats = measure(lambda: laplace_predictive(la, x), repeats)
            rows.append(
                {"method": method, **stats, "max_abs_diff": (theirs - ours).abs().max().item()}
            )
            bar.update()
    return ours, rows


# -- outputs -------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]], repeats: int) -> str:
    """The comparison table in Markdown."""
    lines = [
        f"| task | posterior | method | time (median of {repeats}) | peak memory above "
        "baseline | max abs difference to pushforward |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(
            f"| {r['task']} | {STRUCTURE_NAMES[r['structure']]} | {METHODS[r['method']]} | "
            f"{format_seconds(r['time_median_s'])} | "
            f"{format_bytes(r['peak_above_baseline_bytes'])} | {diff} |"
        )
    return "\n".join(lines)


def write_plot(path: Path, panels: dict[str, dict[str, Any]], data: Data) -> None:
    """One row per posterior: the regression band (mean ± 2 sd) and the moons' predictive
    entropy with the decision boundary and the training points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(STRUCTURES), 2, figsize=(13, 5 * len(STRUCTURES)))
    for (ax_reg, ax_cls), structure in zip(axes, STRUCTURES, strict=True):
        name = STRUCTURE_NAMES[structure]
        reg = panels[f"regression/{structure}"]
        x, mean, sd = reg["x"][:, 0], reg["mean"][:, 0], reg["sd"][:, 0]
        ax_reg.axvspan(*GAP, color="0.92", label="gap (no data)")
        ax_reg.fill_between(
            x, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.3, lw=0, label="mean ± 2 sd"
        )
        ax_reg.plot(x, x.sin(), "k--", lw=1, label="sin(x)")
        ax_reg.plot(x, mean, color="C0", lw=2, label="predictive mean")
        ax_reg.scatter(data.reg_x[:, 0], data.reg_y[:, 0], s=12, color="C3", label="data", zorder=3)
        ax_reg.set(
            xlim=LINE_RANGE,
            ylim=(-3, 3),
            xlabel="x",
            ylabel="y",
            title=f"Regression, {name} posterior: sd {reg['sd_gap']:.2f} in the gap, "
            f"{reg['sd_data']:.2f} on the data\n(prior precision {reg['prior_precision']:.3g}, "
            f"σ {reg['sigma_noise']:.3g})",
        )
        ax_reg.legend(loc="upper center", ncol=3, fontsize=8)
        if structure == "diag":
            ax_reg.text(
                0.02,
                0.03,
                "a diagonal posterior drops the weights' correlations:\n"
                "its band hardly widens between the data",
                transform=ax_reg.transAxes,
                fontsize=8,
                color="0.3",
            )

        cls = panels[f"two moons/{structure}"]
        (x0, x1), (y0, y1) = GRID_RANGE
        extent = (x0, x1, y0, y1)
        image = ax_cls.imshow(
            cls["entropy"],
            origin="lower",
            extent=extent,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=math.log(2),
        )
        fig.colorbar(image, ax=ax_cls, label="predictive entropy (nats)")
        ax_cls.contour(
            cls["p1"], levels=[0.5], origin="lower", extent=extent, colors="C3", linestyles="--"
        )
        for label, face, edge in ((0, "white", "black"), (1, "black", "white")):
            pts = data.moons_x[data.moons_y == label]
            ax_cls.scatter(pts[:, 0], pts[:, 1], s=14, c=face, edgecolors=edge, lw=0.6)
        ax_cls.set(
            xlim=(x0, x1),
            ylim=(y0, y1),
            xlabel="x₁",
            ylabel="x₂",
            title=f"Two moons, {name} posterior: predictive entropy (probit)\n"
            f"(prior precision {cls['prior_precision']:.3g}; dashed: p = 0.5)",
        )
    fig.suptitle(
        "GLM predictive by pushforward on laplace-torch posteriors (PushforwardGGN backend)",
        fontsize=13,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the job -------------------------------------------------------------------------------
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` within the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def regression_case(
    regressor: nn.Module, data: Data, structure: str, sigma: float, cfg: Config
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Fit the regressor's posterior, compare the predictives on the line: table rows, the
    plot panel and the fit's summary (hyperparameters, mean sd in the gap and on the data)."""
    la = fit_laplace(regressor, data.reg_x, data.reg_y, "regression", structure, sigma)
    line = torch.linspace(*LINE_RANGE, cfg.line)[:, None]
    ours, rows = compare(la, line, cfg.repeats, f"regression, {structure}")
    mean, sd = ours[:, :1], ours[:, 1:].sqrt()
    on_data = torch.zeros(cfg.line, dtype=torch.bool)
    for a, b in DATA_RANGES:
        on_data |= (line[:, 0] >= a) & (line[:, 0] <= b)
    summary = {
        "prior_precision": la.prior_precision.item(),
        "sigma_noise": la.sigma_noise.item(),
        "sd_gap": sd[line[:, 0].abs() <= GAP_CORE].mean().item(),
        "sd_data": sd[on_data].mean().item(),
    }
    panel = {"x": line, "mean": mean, "sd": sd, **summary}
    return [{"task": "regression", "structure": structure, **r} for r in rows], panel, summary


def classification_case(
    classifier: nn.Module, data: Data, structure: str, cfg: Config
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    """Fit the classifier's posterior, compare the predictives on the grid: table rows, the
    plot panel and the fit's summary (prior precision, mean and largest predictive entropy)."""
    la = fit_laplace(classifier, data.moons_x, data.moons_y, "classification", structure)
    (x0, x1), (y0, y1) = GRID_RANGE
    gx, gy = torch.meshgrid(
        torch.linspace(x0, x1, cfg.grid), torch.linspace(y0, y1, cfg.grid), indexing="xy"
    )
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    probs, rows = compare(la, grid, cfg.repeats, f"two moons, {structure}")
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    summary = {
        "prior_precision": la.prior_precision.item(),
        "entropy_mean": entropy.mean().item(),
        "entropy_max": entropy.max().item(),
    }
    panel = {
        "entropy": entropy.reshape(cfg.grid, cfg.grid),
        "p1": probs[:, 1].reshape(cfg.grid, cfg.grid),
        **summary,
    }
    return [{"task": "two moons", "structure": structure, **r} for r in rows], panel, summary


def run_demo(
    out: str | Path, quick: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the demo, write ``demo.png``, ``results.md`` and ``results.json`` to ``out``.

    Args:
        out: output directory (created).
        quick: :data:`QUICK` sizes (seconds, for tests) instead of :data:`FULL`.
        echo: where progress lines and the table go (tqdm bars go to stderr).

    Returns:
        What ``results.json`` holds.
    """
    start = time.perf_counter()
    cfg = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(THREADS):
        machine = machine_info()
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        data = Data(*two_moons(cfg.moons, 0.15, g), *gap_regression(cfg.regression, 0.1, g))
        classifier, regressor = mlp(2, 2, cfg.width), mlp(1, 1, cfg.width)
        ce = train(
            classifier, data.moons_x, data.moons_y, nn.CrossEntropyLoss(), cfg.steps, "classifier"
        )
        mse = train(regressor, data.reg_x, data.reg_y, nn.MSELoss(), cfg.steps, "regressor")
        with torch.no_grad():
            accuracy = (classifier(data.moons_x).argmax(-1) == data.moons_y).float().mean()
        echo(
            f"classifier: cross-entropy {ce:.4f}, accuracy {accuracy.item():.1%}; regressor: "
            f"mean squared error {mse:.4f} (σ = its root, {math.sqrt(mse):.4f})"
        )
        rows: list[dict[str, Any]] = []
        panels: dict[str, dict[str, Any]] = {}
        fits: dict[str, dict[str, float]] = {}
        for structure in STRUCTURES:
            key = f"regression/{structure}"
            new, panels[key], fits[key] = regression_case(
                regressor, data, structure, math.sqrt(mse), cfg
            )
            rows += new
        for structure in STRUCTURES:
            key = f"two moons/{structure}"
            new, panels[key], fits[key] = classification_case(classifier, data, structure, cfg)
            rows += new

    write_plot(out / "demo.png", panels, data)
    header = (
        f"GLM predictive on the same fitted laplace-torch posterior: regression on {cfg.line} "
        f"points of a line, two moons on a {cfg.grid}x{cfg.grid} grid; laplace-torch in "
        f"batches of {LAPLACE_BATCH}. {machine['cpu']}, {THREADS} torch thread, torch "
        f"{machine['torch']}, laplace-torch {machine['packages']['laplace-torch']}."
    )
    table = markdown_table(rows, cfg.repeats)
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    results = {
        "config": asdict(cfg),
        "quick": quick,
        "threads": THREADS,
        "laplace_batch": LAPLACE_BATCH,
        "machine": machine,
        "training": {"classifier_loss": ce, "classifier_accuracy": accuracy.item(), "mse": mse},
        "fits": fits,
        "comparison": rows,
        "wall_time_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    echo(f"\n{header}\n\n{table}\n")
    for structure in STRUCTURES:
        f = fits[f"regression/{structure}"]
        echo(
            f"regression, {STRUCTURE_NAMES[structure]} posterior: predictive sd {f['sd_gap']:.3f} "
            f"in the gap (|x| <= {GAP_CORE}), {f['sd_data']:.3f} on the data"
        )
    echo(
        f"wrote {out / 'demo.png'}, {out / 'results.md'} and {out / 'results.json'} in "
        f"{results['wall_time_s']:.0f} s"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """``python examples/demo.py [--out DIR] [--quick]`` (``make demo``)."""
    parser = argparse.ArgumentParser(
        description="Train a two-moons classifier and a 1-D regressor with a data gap, fit "
        "diagonal and Kronecker Laplace posteriors with laplace-torch and this library's "
        "backend, and compare this library's GLM predictive with laplace-torch's own; writes "
        "demo.png, results.md and results.json."
    )
    parser.add_argument("--out", default="demo_output", help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds")
    args = parser.parse_args(argv)
    run_demo(args.out, quick=args.quick, echo=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

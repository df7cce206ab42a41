"""Bayesian optimization of Hartmann6 with a neural-network surrogate and a Laplace posterior.

``python examples/bo_hartmann.py [--tiny] [--out DIR]``: offline, seeded, one torch thread.

Three searches start from the same random points and spend the same evaluations, ``q`` per
iteration:

* **qLogEI**: each iteration trains an MLP 6-H-H-1 (tanh) from scratch on the standardized
  observations (full-batch Adam), fits a Kronecker Laplace approximation with
  :mod:`pushforward.curvature` (``GGN(...).kfac()``; prior precision and observation noise by
  marginal likelihood with ``optimize_prior_precision(..., optimize_sigma=True)``; see
  :func:`fit_surrogate`), wraps it as a BoTorch model (:class:`pushforward.botorch.PushforwardModel`
  with ``noise=σ²`` and the outcome standardization as its outcome transform) and proposes
  ``q`` points with ``optimize_acqf(qLogExpectedImprovement)`` — the posterior of each q-batch
  is its joint Gaussian, computed per t-batch;
* **Thompson sampling**: the same surrogate; the ``q`` points maximize ``q`` pathwise sample
  functions ``f(x) + J(x) L z_i`` of the linearized network
  (:func:`pushforward.botorch.thompson_candidates`, multi-start L-BFGS-B with exact gradients);
* **random search**: ``q`` uniform points.

Written to the output directory: ``bo_hartmann.png`` (best value found against the number of
evaluations, the global maximum 3.32237 dashed) and ``results.json`` (every evaluation and the
best-so-far curves). ``--tiny`` shrinks everything to check the loop in seconds (``make test``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPE = torch.float64
THREADS = 1
OPTIMUM = 3.32237


@dataclass(frozen=True)
class Config:
    """Sizes of a run."""

    n_init: int = 10
    iterations: int = 20
    q: int = 4
    hidden: int = 100
    epochs: int = 1000
    marglik_steps: int = 100
    num_restarts: int = 10
    raw_samples: int = 512
    seeds: int = 3


TINY = Config(
    n_init=6,
    iterations=2,
    q=2,
    hidden=8,
    epochs=50,
    marglik_steps=10,
    num_restarts=2,
    raw_samples=32,
    seeds=1,
)


def objective() -> tuple[object, Tensor]:
    """Hartmann6, negated (to maximize), and its bounds ``(2, 6)``."""
    from botorch.test_functions import Hartmann

    f = Hartmann(dim=6, negate=True).to(DTYPE)
    return f, f.bounds.to(DTYPE)


def fit_surrogate(X: Tensor, Y: Tensor, cfg: Config, seed: int):
    """Train an MLP on ``(X, Y)`` (standardized) and return its PushforwardModel, fitted with
    :mod:`pushforward.curvature` alone.

    The posterior is the K-FAC Laplace approximation. Its prior precision δ and noise σ maximize
    the marginal likelihood of the Lanczos GGN with as many eigenpairs as observations: the GGN
    of ``n`` scalar observations has rank at most ``n``, so that is its exact spectrum. (K-FAC's
    own spectrum has far more nonzero eigenvalues than observations, and its marginal
    likelihood trades them against σ: on a few dozen points it picks a σ larger than the
    targets' spread.)
    """
    from botorch.models.transforms.outcome import Standardize

    import pushforward as pf
    from pushforward.botorch import PushforwardModel

    standardize = Standardize(m=1)
    Ys, _ = standardize(Y)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(X.shape[1], cfg.hidden),
        nn.Tanh(),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.Tanh(),
        nn.Linear(cfg.hidden, 1),
    ).to(DTYPE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(cfg.epochs):
        opt.zero_grad()
        nn.functional.mse_loss(net(X), Ys).backward()
        opt.step()
    net.eval()
    ggn = pf.curvature.GGN(net, [(X, Ys)], "regression")
    delta, sigma = pf.curvature.optimize_prior_precision(
        ggn, ggn.lowrank(len(X)), n_steps=cfg.marglik_steps, optimize_sigma=True
    )
    cov = pf.curvature.laplace_posterior(ggn.kfac(), delta, sigma_noise=sigma)
    return PushforwardModel(net, cov, noise=sigma.square(), outcome_transform=standardize)


def propose(
    method: str, X: Tensor, Y: Tensor, bounds: Tensor, cfg: Config, seed: int, step: int
) -> Tensor:
    """``q`` new points ``(q, 6)`` by ``method`` at iteration ``step`` of the run ``seed``."""
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.optim import optimize_acqf

    from pushforward.botorch import thompson_candidates

    seed = seed * 1000 + step
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(cfg.q, 6, generator=g, dtype=DTYPE)
    model = fit_surrogate(X, Y, cfg, seed)
    torch.manual_seed(seed)
    if method == "qlogei":
        acqf = qLogExpectedImprovement(model, best_f=Y.max())
        candidates, _ = optimize_acqf(
            acqf, bounds, q=cfg.q, num_restarts=cfg.num_restarts, raw_samples=cfg.raw_samples
        )
        return candidates.detach()
    candidates, _ = thompson_candidates(
        model,
        bounds,
        cfg.q,
        generator=torch.Generator().manual_seed(seed),
        num_restarts=cfg.num_restarts,
        raw_samples=cfg.raw_samples,
    )
    return candidates.detach()


METHODS = {
    "qlogei": "qLogEI (q-batch joint posterior)",
    "thompson": "Thompson sampling (pathwise samples)",
    "random": "random search",
}


def run(cfg: Config, seed: int) -> dict[str, dict]:
    """Every method's evaluations and best-so-far curve for one seed (initial design)."""
    f, bounds = objective()
    g = torch.Generator().manual_seed(seed)
    X0 = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(cfg.n_init, 6, generator=g, dtype=DTYPE)
    Y0 = f(X0).unsqueeze(-1)
    results = {}
    for method in METHODS:
        X, Y = X0.clone(), Y0.clone()
        start = time.perf_counter()
        for step in range(cfg.iterations):
            new = propose(method, X, Y, bounds, cfg, seed, step)
            X, Y = torch.cat([X, new]), torch.cat([Y, f(new).unsqueeze(-1)])
            print(
                f"seed {seed} {method:>8} iteration {step + 1}/{cfg.iterations}: best "
                f"{Y.max().item():.4f} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
        values = Y.squeeze(-1).tolist()
        results[method] = {
            "values": values,
            "best": torch.tensor(values, dtype=DTYPE).cummax(0).values.tolist(),
            "seconds": time.perf_counter() - start,
        }
    return results


def plot(runs: list[dict[str, dict]], cfg: Config, path: Path) -> None:
    """Best value found against evaluations: the mean over seeds, their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in METHODS.items():
        best = torch.tensor([r[method]["best"] for r in runs], dtype=DTYPE)  # (seeds, evaluations)
        x = range(1, best.shape[1] + 1)
        (line,) = ax.plot(x, best.mean(0), label=label)
        if len(runs) > 1:
            ax.fill_between(
                x, best.min(0).values, best.max(0).values, color=line.get_color(), alpha=0.15
            )
    ax.axhline(OPTIMUM, color="gray", linestyle="--", linewidth=1, label="global maximum")
    ax.axvline(cfg.n_init, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(
        "best value found" + (f" (mean and range of {len(runs)} seeds)" if len(runs) > 1 else "")
    )
    ax.set_title(
        f"Hartmann6: MLP 6-{cfg.hidden}-{cfg.hidden}-1 + Kronecker Laplace, q={cfg.q}", fontsize=10
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The command line (``--help``); torch's thread count is restored afterwards."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; make test)")
    parser.add_argument("--out", default="examples/results/bo_hartmann", help="output directory")
    parser.add_argument("--seeds", type=int, help="independent runs (default 3; tiny 1)")
    parser.add_argument("--iterations", type=int, help="BO iterations (default 20; tiny 2)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    """Run the searches, write the plot and the numbers."""
    cfg = TINY if args.tiny else Config()
    changes = {k: v for k, v in (("seeds", args.seeds), ("iterations", args.iterations)) if v}
    cfg = Config(**{**asdict(cfg), **changes})
    runs = [run(cfg, seed) for seed in range(cfg.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, cfg, out / "bo_hartmann.png")
    payload = {"config": asdict(cfg), "tiny": args.tiny, "optimum": OPTIMUM, "runs": runs}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    for method, label in METHODS.items():
        finals = [r[method]["best"][-1] for r in runs]
        seconds = sum(r[method]["seconds"] for r in runs)
        print(
            f"{label}: best after {len(runs[0][method]['best'])} evaluations "
            f"{sum(finals) / len(finals):.4f} (mean of {len(runs)}; {seconds:.1f} s)"
        )
    print(f"wrote {out / 'bo_hartmann.png'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

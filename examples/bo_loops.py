"""Bayesian optimization loops that need not retrain the network after every evaluation.

``python examples/bo_loops.py [--tiny] [--seeds N] [--threads 1] [--out DIR]``

Hartmann6 is minimized from 20 uniform points with an MLP surrogate (ReLU; 6-50-50-1 for q=1,
laplace-bayesopt's examples' width, and 6-200-200-1 for q=4, the wider network whose acquisition
dominates an iteration) and a Kronecker-factored Laplace posterior, proposing ``q`` points per
iteration with
``optimize_acqf(num_restarts=10, raw_samples=20)``: analytic ``ExpectedImprovement`` (q=1) and
``qLogExpectedImprovement`` (q=4). Two loops see the same initial points:

* **retrain every step** — laplace-bayesopt's ``LaplaceBoTorch`` as its examples use it: after
  every evaluation ``model.condition_on_observations(x, y)`` retrains a freshly initialized
  network on all the data (Adam, learning rate 0.1 with cosine decay, weight decay 1e-3,
  batches of 10, 1,000 epochs), refits the Laplace approximation (laplace-torch, K-FAC) and
  tunes prior precision and noise by marginal likelihood;
* **refit every k, condition exactly in between** — the same fit (``LaplaceBoTorch`` on all the
  data) every ``k`` iterations only, wrapped as a :class:`~pushforward.botorch.PushforwardModel`
  (``PushforwardModel.from_laplace(laplace_botorch_model)``: the same posterior); between refits
  ``model.condition_on_observations(x, y)`` conditions the linearized network (a Gaussian
  process with kernel ``J S J^T``) on the new points exactly — mean and covariance — without
  training.

The two loops differ only in how the model learns the new points: the surrogate, its training
recipe, the Laplace fit and the acquisition optimization are the same.

Both add the observation noise to every posterior (as ``LaplaceBoTorch`` does). Each
(loop, acquisition, seed) runs in a fresh process with one torch thread, the sides interleaved;
written to the output directory: ``results.json`` (every evaluation, time and peak memory per
run, the machine and its load) and ``results.md`` (the per-seed table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.data as du
from torch import Tensor, nn

DTYPE = torch.float64
LOOPS = {
    "retrain-every-step": "LaplaceBoTorch, retrained after every evaluation",
    "refit-every-k": "PushforwardModel, refit every k iterations, exact conditioning between",
}
ACQUISITIONS = {"ei": "ExpectedImprovement, q=1", "qlogei": "qLogExpectedImprovement, q=4"}
Q = {"ei": 1, "qlogei": 4}


@dataclass(frozen=True)
class Config:
    """Sizes of a run (network, training and acquisition optimization: laplace-bayesopt's
    defaults and examples)."""

    n_init: int = 20
    evaluations: tuple[tuple[str, int], ...] = (("ei", 40), ("qlogei", 40))
    hidden: tuple[tuple[str, int], ...] = (("ei", 50), ("qlogei", 200))
    epochs: int = 1000
    batch_size: int = 10
    lr: float = 0.1
    weight_decay: float = 1e-3
    marglik_steps: int = 100
    num_restarts: int = 10
    raw_samples: int = 20
    refit_every: tuple[tuple[str, int], ...] = (("ei", 10), ("qlogei", 2))


TINY = Config(
    n_init=8,
    evaluations=(("ei", 4), ("qlogei", 8)),
    hidden=(("ei", 8), ("qlogei", 8)),
    epochs=5,
    marglik_steps=5,
    num_restarts=2,
    raw_samples=8,
    refit_every=(("ei", 2), ("qlogei", 1)),
)


def hartmann() -> tuple[object, Tensor]:
    """Hartmann6 (to minimize; its minimum is -3.32237) and its bounds ``(2, 6)``."""
    from botorch.test_functions import Hartmann

    return Hartmann(dim=6).to(DTYPE), torch.tensor([[0.0] * 6, [1.0] * 6], dtype=DTYPE)


def make_net(hidden: int) -> nn.Module:
    """The surrogate network, freshly initialized from torch's global generator."""
    return nn.Sequential(
        nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    ).to(DTYPE)


def train(net: nn.Module, X: Tensor, Y: Tensor, cfg: Config) -> nn.Module:
    """Mean-squared-error training: Adam with weight decay, cosine-annealed over every step,
    shuffled mini-batches (the recipe of ``LaplaceBoTorch``'s post-hoc mode)."""
    loader = du.DataLoader(du.TensorDataset(X, Y), batch_size=cfg.batch_size, shuffle=True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * len(loader))
    for _ in range(cfg.epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            schedule.step()
    return net.eval()


def refit(X: Tensor, Y: Tensor, cfg: Config, hidden: int):
    """The same fit as the retraining loop's (a freshly trained network, its laplace-torch
    K-FAC posterior, prior precision and noise tuned by marginal likelihood), as a
    :class:`~pushforward.botorch.PushforwardModel` (its noise in every posterior)."""
    from pushforward.botorch import PushforwardModel

    return PushforwardModel.from_laplace(laplace_botorch(X, Y, cfg, hidden))


def acquisition(kind: str, model, best: float):
    """The acquisition function minimizing the objective (``best``: the smallest value seen)."""
    from botorch.acquisition import ExpectedImprovement, qLogExpectedImprovement
    from botorch.acquisition.objective import LinearMCObjective

    if kind == "ei":
        return ExpectedImprovement(model, best_f=best, maximize=False)
    minus = LinearMCObjective(torch.tensor([-1.0], dtype=DTYPE))
    return qLogExpectedImprovement(model, best_f=-best, objective=minus)


def run(loop: str, kind: str, seed: int, cfg: Config) -> dict:
    """One BO run: every evaluation, the best value and the time of its parts."""
    from botorch.optim import optimize_acqf

    f, bounds = hartmann()
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(cfg.n_init, 6, generator=g, dtype=DTYPE)
    Y = f(X).unsqueeze(-1)
    torch.manual_seed(seed)
    q = Q[kind]
    every = dict(cfg.refit_every)[kind]
    hidden = dict(cfg.hidden)[kind]
    iterations = (dict(cfg.evaluations)[kind] + q - 1) // q
    fit_s = acq_s = 0.0
    start = time.perf_counter()
    model = None
    for step in range(iterations):
        t0 = time.perf_counter()
        if loop == "retrain-every-step":
            model = laplace_botorch(X, Y, cfg, hidden) if model is None else model
        elif step % every == 0:
            model = refit(X, Y, cfg, hidden)
        t1 = time.perf_counter()
        acqf = acquisition(kind, model, Y.min().item())
        candidates, _ = optimize_acqf(
            acqf, bounds, q=q, num_restarts=cfg.num_restarts, raw_samples=cfg.raw_samples
        )
        x = candidates.detach().reshape(q, 6)
        y = f(x).unsqueeze(-1)
        t2 = time.perf_counter()
        X, Y = torch.cat([X, x]), torch.cat([Y, y])
        last = step == iterations - 1
        if loop == "retrain-every-step" and not last:
            model = model.condition_on_observations(x, y)  # retrains on all the data
        elif loop == "refit-every-k" and not last and (step + 1) % every != 0:
            model = model.condition_on_observations(x, y)  # exact, no training
        t3 = time.perf_counter()
        fit_s += (t1 - t0) + (t3 - t2)
        acq_s += t2 - t1
    values = Y.squeeze(-1)
    return {
        "loop": loop,
        "acquisition": kind,
        "seed": seed,
        "values": values.tolist(),
        "best": values.min().item(),
        "seconds": time.perf_counter() - start,
        "fit_seconds": fit_s,
        "acquisition_seconds": acq_s,
    }


def laplace_botorch(X: Tensor, Y: Tensor, cfg: Config, hidden: int):
    """laplace-bayesopt's model with its defaults (training sizes from ``cfg``, ``hidden`` units
    per layer)."""
    from laplace_bayesopt.botorch import LaplaceBoTorch

    return LaplaceBoTorch(
        lambda: make_net(hidden),
        X,
        Y,
        batch_size=cfg.batch_size,
        n_epochs=cfg.epochs,
        lr=cfg.lr,
        wd=cfg.weight_decay,
        posthoc_marglik_iters=cfg.marglik_steps,
    )


# -- the side-by-side benchmark -----------------------------------------------------------------
def _busy_jiffies() -> int | None:
    """Busy CPU time of the whole machine (``/proc/stat``), in clock ticks."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def run_in_process(loop: str, kind: str, seed: int, args: argparse.Namespace) -> dict:
    """One run in a fresh interpreter (one torch thread); its result with the wall time, the
    process's peak memory and the CPU the rest of the machine used meanwhile."""
    command = [sys.executable, __file__, "--worker", loop, kind, str(seed)]
    command += ["--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    if args.evaluations:
        command += ["--evaluations", str(args.evaluations)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, wall = _busy_jiffies(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{loop} {kind} seed {seed} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if busy is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        result["others_cpu_cores"] = max(0.0, ((_busy_jiffies() - busy) / ticks - own) / wall)
    result["process_seconds"] = wall
    return result


def table(results: list[dict], refit_every: dict[str, int]) -> str:
    """The per-seed Markdown table and the summary lines."""
    lines = []
    for kind, label in ACQUISITIONS.items():
        rows = {(r["seed"], r["loop"]): r for r in results if r["acquisition"] == kind}
        seeds = sorted({s for s, _ in rows if all((s, loop) in rows for loop in LOOPS)})
        if not seeds:
            continue
        lines += [
            f"### {label} (refit every {refit_every[kind]} iterations)",
            "",
            "| seed | retrain every step: best | time (s) | refit every k: best | time (s) | "
            "speed-up |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for s in seeds:
            a, b = rows[(s, "retrain-every-step")], rows[(s, "refit-every-k")]
            lines.append(
                f"| {s} | {a['best']:.4f} | {a['seconds']:.1f} | {b['best']:.4f} | "
                f"{b['seconds']:.1f} | {a['seconds'] / b['seconds']:.1f}x |"
            )
        a = [rows[(s, "retrain-every-step")] for s in seeds]
        b = [rows[(s, "refit-every-k")] for s in seeds]
        ta, tb = sum(r["seconds"] for r in a), sum(r["seconds"] for r in b)
        ma, mb = (sum(r["best"] for r in rs) / len(rs) for rs in (a, b))
        lines.append(
            f"| mean / total | {ma:.4f} | {ta:.1f} | {mb:.4f} | {tb:.1f} | {ta / tb:.1f}x |"
        )
        load = [r.get("others_cpu_cores") for r in a + b if r.get("others_cpu_cores") is not None]
        if load:
            lines.append("")
            lines.append(
                f"Other processes kept {min(load):.2f}-{max(load):.2f} cores busy "
                f"(mean {sum(load) / len(load):.2f}) during these runs."
            )
        lines.append("")
    return "\n".join(lines)


def write(out: Path, cfg: Config, args: argparse.Namespace, results: list[dict]) -> str:
    """``results.json`` and ``results.md`` of the runs so far; the table's text."""
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "loadavg": os.getloadavg(),
    }
    payload = {"config": asdict(cfg), "tiny": args.tiny, "machine": machine, "runs": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = table(results, dict(cfg.refit_every))
    (out / "results.md").write_text(
        "# Hartmann6: retrain every step vs refit every k with exact conditioning\n\n"
        + "Surrogates: "
        + ", ".join(f"{ACQUISITIONS[k]}: MLP 6-{h}-{h}-1" for k, h in cfg.hidden)
        + ".\n\n"
        + text
    )
    return text


def main(argv: list[str] | None = None) -> int:
    """The command line (``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; make test)")
    parser.add_argument("--seeds", type=int, default=8, help="independent runs (default 8)")
    parser.add_argument("--evaluations", type=int, help="evaluations after the initial design")
    parser.add_argument("--acquisitions", nargs="+", default=list(ACQUISITIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results/bo_loops", help="output directory")
    parser.add_argument(
        "--worker", nargs=3, metavar=("LOOP", "ACQ", "SEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else Config()
    if args.evaluations:
        cfg = Config(**{**asdict(cfg), "evaluations": tuple((k, args.evaluations) for k in Q)})
    if args.worker:
        torch.set_num_threads(args.threads)
        torch.set_default_dtype(DTYPE)  # as laplace-bayesopt's examples (its noise is added
        # with torch.eye of the default dtype)
        loop, kind, seed = args.worker
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run(loop, kind, int(seed), cfg)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for seed in range(args.seeds):
        for kind in args.acquisitions:
            for loop in LOOPS:
                r = run_in_process(loop, kind, seed, args)
                results.append(r)
                write(out, cfg, args, results)  # as it goes: a stopped run keeps its results
                print(
                    f"seed {seed} {kind:>6} {loop:>18}: best {r['best']:.4f} in "
                    f"{r['seconds']:.1f} s (fit {r['fit_seconds']:.1f} s; others "
                    f"{r.get('others_cpu_cores', float('nan')):.2f} cores)",
                    flush=True,
                )
    text = write(out, cfg, args, results)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

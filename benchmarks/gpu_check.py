"""GPU check: every exact strategy on CUDA against the CPU float64 result, and GPU timings.

Run on a machine with a CUDA device from the repository root::

    PYTHONPATH=src:tests python benchmarks/gpu_check.py [OUT_DIR]

Part 1 runs the model zoo of the tests (float64) on the GPU with each exact strategy and
compares variances, per-example and joint covariances with the same computation on the CPU.
Part 2 times the layer-structured strategy and 100 linearized samples on the W1/W3/W4 workloads
(float32, median of 5 calls after a warm-up; peak CUDA memory above the memory held before).
Results are printed and written to ``OUT_DIR/gpu_check.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import pushforward as pf

warnings.simplefilter("ignore")


def compare_zoo() -> list[dict]:
    from test_variance import make_cov
    from zoo import FACTORIES, make_case

    rows = []
    for name in FACTORIES:
        try:
            make_case(name)
        except ImportError as err:  # e.g. transformers not installed on the GPU machine
            print(f"skipping {name}: {err}")
            continue
        for cov_kind in ("diag", "kron", "lowrank"):
            case = make_case(name)
            cov = make_cov(cov_kind, case.fm)
            for strategy in ("structured", "reverse", "forward", "auto"):
                try:
                    ref = [
                        pf.functional_variance(case.fm, case.x, cov, strategy=strategy)[1],
                        pf.functional_covariance(
                            case.fm, case.x, cov, joint=True, strategy=strategy
                        )[1],
                    ]
                except ValueError:  # strategy not applicable to this problem
                    continue
                gpu = make_case(name)
                gpu.fm.module.cuda()
                x = _to(gpu.x, "cuda")
                out = [
                    pf.functional_variance(gpu.fm, x, cov.to("cuda"), strategy=strategy)[1],
                    pf.functional_covariance(
                        gpu.fm, x, cov.to("cuda"), joint=True, strategy=strategy
                    )[1],
                ]
                err = max(
                    ((o.cpu() - r).abs().max() / r.abs().max().clamp_min(1e-300)).item()
                    for o, r in zip(out, ref, strict=True)
                )
                rows.append({"model": name, "cov": cov_kind, "strategy": strategy, "rel_err": err})
    return rows


def _to(x, device):
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _median_time(fn, repeats: int = 5) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    times, peaks = [], []
    for _ in range(repeats):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peaks.append(torch.cuda.max_memory_allocated() - before)
    return statistics.median(times), max(peaks)


def timings() -> list[dict]:
    rows = []
    for label, K, B, arch in (
        ("W1", 10, 256, "mlp"),
        ("W3", 1000, 64, "mlp"),
        ("W4", 10, 64, "cnn"),
    ):
        rows += _workload(label, K, B, arch)
    return rows


def _model(arch: str, K: int) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, K)
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, K),
    )  # fmt: skip


def _workload(label: str, K: int, B: int, arch: str) -> list[dict]:
    torch.manual_seed(0)
    model = _model(arch, K).cuda().eval()
    x = torch.randn(B, *((784,) if arch == "mlp" else (1, 28, 28)), device="cuda")
    fm = pf.FunctionalModel(model)
    cov = pf.Diagonal(torch.rand(fm.num_params, device="cuda") * 1e-3)
    g = torch.Generator(device="cuda")

    def samples():
        g.manual_seed(0)
        return pf.functional_samples(fm, x, cov, 100, generator=g)

    def forwards():
        with torch.no_grad():
            for _ in range(100):
                model(x)

    cases = {
        f"functional_variance ({pf.plan(fm, x, cov).name})": lambda: pf.functional_variance(
            fm, x, cov
        ),
        "functional_covariance per example": lambda: pf.functional_covariance(fm, x, cov),
    }
    if label == "W1":
        cases |= {"100 samples": samples, "100 forward passes": forwards}
    rows = []
    for what, fn in cases.items():
        t, mem = _median_time(fn)
        rows.append({"workload": label, "what": what, "time_s": t, "peak_bytes": mem})
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    zoo = compare_zoo()
    worst = max(zoo, key=lambda r: r["rel_err"])
    print(f"zoo: {len(zoo)} comparisons GPU vs CPU (float64), worst {worst}")
    rows = timings()
    for r in rows:
        print(
            f"{r['workload']} {r['what']}: {r['time_s'] * 1e3:.2f} ms, {r['peak_bytes'] / 1e6:.1f} MB"
        )
    payload = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "zoo": zoo,
        "timings": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

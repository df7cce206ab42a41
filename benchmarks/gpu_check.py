"""GPU check: the library's GPU figures beside laplace-torch, BackPACK and curvlinops, in one run.

Row groups (``--list``; each guarded: a failure or an out-of-memory is recorded and the run goes
on; each has a time budget, its elapsed time printed):

* ``w1`` — W1 MLP 784-256-256-10, B=256, diagonal S from a fitted laplace-torch DiagLaplace
  (``pf.from_laplace``): the model's forward and forward+backward, ``functional_variance``
  (default; replay off; through ``pf.compile``, its ``.program`` recorded), the per-example
  covariance, laplace-torch's ``la._glm_predictive_distribution(x)``
  on the same posterior; then B = 1 / 16 / 256 / 4096, eager and compiled.
* ``w1-kron`` (KronLaplace), ``w4`` (the CNN of ``benchmarks/cases/workloads.py``, B=64),
  ``w3`` (K=1000, B=64): the same predictive rows.
* ``curvature`` — exact diagonal GGN of W1 over 16,384 points in batches of 2,048
  (``GGN(model, data).diagonal()`` for the ``nn.Sequential`` and the same MLP as a custom
  module) beside BackPACK's ``DiagGGNExact``; K-FAC (``GGN(...).kfac()``) beside curvlinops'
  ``KFACLinearOperator``; values checked against both.
* ``llm`` — a Llama of TinyLlama-1.1B's dimensions from a config (22 layers, d=2048,
  intermediate 5632, 32 heads / 4 KV heads, vocabulary 32,000; random weights), peft LoRA r=8
  on q_proj, v_proj, B=8, T=256, right-padded, float32: the forward; the exact variance and the
  4 x 4 covariance of 4 answer-token logits at the last non-pad token (``outputs=``); the exact
  last-token diagonal GGN and K-FAC of one batch; the all-token Monte Carlo K-FAC
  (``mc_samples=1``) over 4 batches; the full-vocabulary MC predictive with 8 draws; each also
  as a multiple of the forward, with its peak memory above the model. laplace-torch's
  KronLaplace and GLM predictive at B=2 beside pushforward on that posterior. A chunk-target
  sweep of the two answer-logit passes (how far the defaults are from the best target).
* ``llm-bf16`` — the same passes with a bfloat16 base and float32 LoRA weights, the variances,
  covariances and GGN diagonal checked against the float32 model with the same weights.
* ``botorch`` — ``optimize_acqf(qLogExpectedImprovement, q=4, num_restarts=10,
  raw_samples=512)`` on a PushforwardModel of an MLP 6-200-200-1; 100 posterior calls.
* ``zoo`` — the test zoo (``tests/zoo.py``, float64) and a GRU and an LSTM model (eval mode,
  linear head) on the device: every exact strategy, ``auto`` and ``pf.compile``, variance and
  joint covariance, against the CPU brute force and the same call on the CPU; the recurrent
  models' ``GGN(...).diagonal()`` / ``.kfac()`` against the CPU. Pass/fail with the error text.

Timing: the first call is the cold one (recorded apart); then warm calls (5 at most, fewer when
a row would take over ``--row-seconds``), their median recorded; the peak is
``torch.cuda.max_memory_allocated`` above what was allocated right before the call (on a CPU
the RSS high-water mark above the RSS). float32 runs with TF32 off. A call running past
``--call-limit`` (120 s) is interrupted and recorded as a timeout; groups that would start after
``--max-total`` (540 s) are recorded as skipped.

Setting up a GPU machine (the repository's ``.venv`` is CPU-only and stays here). With an
internet connection, in a virtual environment that sees the machine's CUDA PyTorch::

    python -m venv --system-site-packages .venv-gpu && . .venv-gpu/bin/activate
    pip install -e '.[test,hf,laplace,bo]' backpack-for-pytorch curvlinops-for-pytorch

Without one, on an image that has PyTorch, transformers, peft, BoTorch, scipy, torchvision,
einops, opt-einsum, linear-operator and torchmetrics but not the anchors: fetch the anchors and
their remaining dependencies (pure-Python wheels, 0.5 MB) where pip works, into a git-ignored
folder that travels with the tree::

    pip download --no-deps -d benchmarks/results/tmp/wheels laplace-torch==0.3 \
        backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 asdfghjkl==0.1a4 \
        unfoldNd==0.2.3 einconv==0.1.0

and there, before the run::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site \
        benchmarks/results/tmp/wheels/*.whl && export PYTHONPATH=/tmp/site

Then, from the repository root (pushforward from ``src/``, not installed; about 8 minutes on an
H100/H200)::

    PYTHONUNBUFFERED=1 PYTHONPATH=src:$PYTHONPATH python3 benchmarks/gpu_check.py \
        --out benchmarks/results/gpu_check

An anchor that cannot be imported is recorded as skipped with the reason. ``--device cpu
--quick`` runs every group at tiny sizes on a CPU in a few minutes (a check of the script, not
a measurement). Output: ``OUT/gpu_check.json`` (every number; rewritten after each group) and
``OUT/gpu_check.md`` (a summary in the shape of the GPU table, then every group's rows, value
checks and notes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from gpu_measure import (
    CallTimeout,
    Env,
    Group,
    describe_error,
    format_bytes,
    format_time,
    free_memory,
)
from gpu_rows import GROUPS

import pushforward as pf

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def _meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from harness.report import machine_info

    meta: dict[str, Any] = machine_info(str(device))
    meta |= {
        "commit": _commit(),
        "quick": args.quick,
        "repeats": args.repeats,
        "row_seconds": args.row_seconds,
        "budget_scale": args.budget_scale,
        "max_total_s": args.max_total,
        "call_limit_s": args.call_limit,
        "tf32": False,
        "settings": pf.settings.current().describe(),
        "command": " ".join(sys.argv),
    }
    for dist in ("transformers", "peft", "botorch"):
        try:
            meta["packages"][dist] = __import__(dist).__version__
        except Exception as err:
            meta["packages"][dist] = f"not importable: {describe_error(err)['error']}"
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        free, total = torch.cuda.mem_get_info(device)
        meta["gpu_memory_bytes"] = {"free": free, "total": total}
    return meta


# -- the report ------------------------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row_line(entry: dict[str, Any]) -> str:
    if entry.get("status") != "ok":
        what = f"{entry.get('status')}: {entry.get('error', '')}"
        return f"| {_cell(entry['row'])} | {entry['library']} | — | — | {_cell(what)} |"
    ratios = "; ".join(f"{v:.3g}× {k}" for k, v in (entry.get("ratios") or {}).items())
    notes = []
    if not entry["warm"]:
        notes.append("cold call only")
    program = (entry.get("info") or {}).get("program")
    if program:
        notes.append(f"program: {program}")
    if entry.get("warnings"):
        notes.append("warned: " + " / ".join(entry["warnings"]))
    text = "; ".join(x for x in (ratios, *notes) if x)
    return (
        f"| {_cell(entry['row'])} | {entry['library']} | {format_time(entry['time_s'])} | "
        f"{format_bytes(entry['peak_bytes'])} | {_cell(text)} |"
    )


def _zoo_lines(results: list[dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    errs = [r["rel_err_vs_brute_force"] for r in results if "rel_err_vs_brute_force" in r]
    cpu = [r["rel_err_vs_cpu"] for r in results if "rel_err_vs_cpu" in r]
    lines = [
        f"Zoo: {len(results)} comparisons — "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (f"; worst relative error vs brute force {max(errs):.2g}" if errs else "")
        + (f", vs the CPU {max(cpu):.2g}" if cpu else "")
        + ".",
        "",
    ]
    bad = [r for r in results if r["status"] in ("fail", "error", "skipped")]
    if bad:
        lines += ["| model | covariance | strategy | status | error / relative error |"]
        lines += ["|---|---|---|---|---|"]
        for r in bad:
            err = r.get("error") or (
                f"{r.get('rel_err_vs_brute_force', float('nan')):.2g} (brute force), "
                f"{r.get('rel_err_vs_cpu', float('nan')):.2g} (CPU)"
            )
            lines.append(
                f"| {r['model']} | {r.get('cov', '')} | {r.get('strategy', '')} | "
                f"{r['status']} | {_cell(err)} |"
            )
        lines.append("")
    return lines


#: The summary table: (label, group, our rows — or a row-name prefix ending in "*" —, anchor).
SUMMARY: tuple[tuple[str, str, tuple[str, ...] | str, str | None], ...] = (
    ("W1 model alone: forward / forward+backward", "w1", ("forward", "forward+backward"), None),
    (
        "W1, B=256, diagonal S: variance / compiled",
        "w1",
        ("variance", "variance, compiled"),
        "GLM predictive (B, K, K)",
    ),
    ("W1 variance, batch sweep", "w1", "variance, B=*", None),
    ("… compiled", "w1", "variance, B=*, compiled", None),
    (
        "W1, Kronecker S: variance / compiled",
        "w1-kron",
        ("variance", "variance, compiled"),
        "GLM predictive (B, K, K)",
    ),
    (
        "W4 CNN, B=64, diagonal S: variance / compiled",
        "w4",
        ("variance", "variance, compiled"),
        "GLM predictive (B, K, K)",
    ),
    ("W4 model alone: forward / forward+backward", "w4", ("forward", "forward+backward"), None),
    (
        "W3, K=1000, B=64: variance / compiled",
        "w3",
        ("variance", "variance, compiled"),
        "GLM predictive (B, K, K)",
    ),
    (
        "Exact diagonal GGN, W1, 16,384 points: nn.Sequential / custom module",
        "curvature",
        ("GGN diagonal, nn.Sequential", "GGN diagonal, custom nn.Module"),
        "DiagGGNExact",
    ),
    (
        "K-FAC, same: nn.Sequential / custom module",
        "curvature",
        ("GGN K-FAC, nn.Sequential", "GGN K-FAC, custom nn.Module"),
        "KFACLinearOperator",
    ),
    ("LLM (float32): forward", "llm", ("forward",), None),
    (
        "… exact variance of 4 answer logits, last token",
        "llm",
        ("4-answer variance, last token",),
        None,
    ),
    ("… 4 x 4 covariance per example", "llm", ("4 x 4 covariance per example",), None),
    (
        "… 4 x 4 covariance at B=2, laplace-torch's posterior",
        "llm",
        ("4 x 4 covariance, B=2, laplace-torch's posterior",),
        "GLM predictive 4 x 4, B=2",
    ),
    (
        "… exact last-token GGN diagonal, 1 batch",
        "llm",
        ("exact last-token GGN diagonal, 1 batch",),
        None,
    ),
    ("… exact last-token K-FAC, 1 batch", "llm", ("exact last-token GGN K-FAC, 1 batch",), None),
    ("… all-token MC K-FAC, 4 batches", "llm", "all-token MC K-FAC*", None),
    ("… full-vocabulary MC predictive, 8 draws", "llm", "full-vocabulary MC predictive*", None),
    ("LLM, bf16 base + fp32 LoRA: forward", "llm-bf16", ("forward",), None),
    ("… exact variance of 4 answer logits", "llm-bf16", ("4-answer variance, last token",), None),
    ("… 4 x 4 covariance per example", "llm-bf16", ("4 x 4 covariance per example",), None),
    (
        "… exact last-token GGN diagonal, 1 batch",
        "llm-bf16",
        ("exact last-token GGN diagonal, 1 batch",),
        None,
    ),
    ("… all-token MC K-FAC, 4 batches", "llm-bf16", "all-token MC K-FAC*", None),
    (
        "… full-vocabulary MC predictive, 8 draws",
        "llm-bf16",
        "full-vocabulary MC predictive*",
        None,
    ),
    ("BoTorch optimize_acqf(qLogEI, q=4), MLP 6-200-200-1", "botorch", "optimize_acqf*", None),
)


def _select(rows: list[dict[str, Any]], ours: tuple[str, ...] | str) -> list[dict[str, Any]]:
    if isinstance(ours, tuple):
        by_name = {e["row"]: e for e in rows}
        return [by_name[n] for n in ours if n in by_name]
    head, _, tail = ours.partition("*")
    return [
        e
        for e in rows
        if e["row"].startswith(head)
        and e["row"].endswith(tail)
        and (tail or not e["row"].endswith("compiled"))
    ]


def _short_cell(entry: dict[str, Any]) -> str:
    if entry.get("status") != "ok":
        return f"{entry.get('status')}: {entry.get('error', '')[:120]}"
    text = f"{format_time(entry['time_s'])}, {format_bytes(entry['peak_bytes'])}"
    forward = (entry.get("ratios") or {}).get("forward")
    per_batch = next((v for k, v in (entry.get("ratios") or {}).items() if "× forward" in k), None)
    if forward is not None:
        text += f" ({forward:.3g}× forward)"
    elif per_batch is not None:
        text += f" ({per_batch:.3g}× forward per batch)"
    program = (entry.get("info") or {}).get("program")
    if program and program != "chain":
        text += f" [{program}]"
    return text


def summary_lines(payload: dict[str, Any]) -> list[str]:
    """The table of :data:`SUMMARY`: our rows, the anchor and the anchor's time over ours."""
    lines = [
        "| workload | pushforward | anchor | anchor / pushforward |",
        "|---|---|---|---|",
    ]
    for label, group, ours, anchor in SUMMARY:
        g = payload["groups"].get(group)
        if g is None:
            continue
        mine = _select(g["rows"], ours)
        if not mine:
            continue
        theirs = next((e for e in g["rows"] if e["row"] == anchor), None) if anchor else None
        ratio = ""
        if theirs is not None and theirs.get("status") == "ok":
            ratio = " / ".join(
                f"{theirs['time_s'] / e['time_s']:.3g}×" for e in mine if e.get("status") == "ok"
            )
        cells = [_short_cell(e) for e in mine]
        if isinstance(ours, str) and len(mine) > 1:  # name each by what the pattern matched
            head, _, tail = ours.partition("*")
            cells = [
                f"{e['row'][len(head) : len(e['row']) - len(tail)]}: {c}"
                for e, c in zip(mine, cells, strict=True)
            ]
        lines.append(
            f"| {_cell(label)} | {_cell(' / '.join(cells))} | "
            f"{_cell('' if theirs is None else theirs['library'] + ': ' + _short_cell(theirs))}"
            f" | {ratio} |"
        )
    zoo = payload["groups"].get("zoo")
    if zoo and "zoo" in zoo["notes"]:
        lines.append(
            f"| zoo, GRU, LSTM on the device (float64) | {_cell(_zoo_lines(zoo['notes']['zoo'])[0])} | | |"
        )
    return [*lines, ""]


def markdown(payload: dict[str, Any]) -> str:
    """The tables of ``payload`` (what ``gpu_check.json`` holds)."""
    meta = payload["meta"]
    device = meta.get("gpu") or meta.get("cpu")
    lines = [
        "# GPU check",
        "",
        f"{device}; torch {meta['torch']}"
        + (f" (CUDA {meta['cuda']})" if meta.get("cuda") else "")
        + f"; pushforward {meta['packages'].get('pushforward')} at {meta.get('commit')}; "
        f"{meta['date']}; float32 with TF32 off"
        + ("; **quick sizes: not a measurement**" if meta["quick"] else "")
        + f"; total {payload.get('total_s', 0):.0f} s.",
        "",
        "Median of warm calls; peak = memory allocated above what was held right before the "
        "call (`torch.cuda.max_memory_allocated`; on a CPU the RSS high-water mark).",
        "",
        *summary_lines(payload),
    ]
    for name, g in payload["groups"].items():
        lines += [f"## {name}: {g['title']}", ""]
        lines.append(f"{g['elapsed_s']:.1f} s (budget {g['budget_s']:.0f} s).")
        if g.get("error"):
            lines.append(
                f"**The group stopped** ({g['error']['status']}): {_cell(g['error']['error'])}"
            )
        lines.append("")
        notes = {k: v for k, v in g["notes"].items() if k != "zoo"}
        lines += [f"- {k}: {_cell(v)}" for k, v in notes.items()]
        if notes:
            lines.append("")
        if g["rows"]:
            lines += ["| row | library | time | peak | ratios, notes |", "|---|---|---|---|---|"]
            lines += [_row_line(e) for e in g["rows"]]
            lines.append("")
        if g["checks"]:
            lines += ["| check | relative error | tolerance | result |", "|---|---|---|---|"]
            for c in g["checks"]:
                err = f"{c['rel_err']:.2g}" if "rel_err" in c else _cell(c.get("error", ""))
                tol = "—" if c.get("tol") is None else f"{c['tol']:g}"
                lines.append(f"| {_cell(c['check'])} | {err} | {tol} | {c['status']} |")
            lines.append("")
        if "zoo" in g["notes"]:
            lines += _zoo_lines(g["notes"]["zoo"])
    return "\n".join(lines) + "\n"


def _write(payload: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(payload))


# -- running -----------------------------------------------------------------------------------
def run_group(name: str, env: Env, budget_s: float) -> dict[str, Any]:
    """Run group ``name`` guarded, with a time budget of ``budget_s``; its JSON."""
    fn, title, _ = GROUPS[name]
    grp = Group(name, title, budget_s, env)
    print(f"== {name}: {title} (budget {grp.budget_s:.0f} s)", flush=True)
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(grp)
    except (Exception, CallTimeout) as err:
        error = describe_error(err)
        print(f"  [{name}] stopped: {error['error']}")
    finally:
        free_memory(env)
    out = grp.to_json()
    if error:
        out["error"] = error
    print(f"== {name}: {grp.elapsed():.1f} s", flush=True)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--only", nargs="+", choices=list(GROUPS), help="run these groups")
    p.add_argument("--skip", nargs="+", choices=list(GROUPS), default=(), help="skip these")
    p.add_argument("--repeats", type=int, default=5, help="warm calls per row at most")
    p.add_argument("--row-seconds", type=float, default=10.0, help="warm calls' time per row")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies group budgets")
    p.add_argument(
        "--max-total", type=float, default=540.0, help="seconds after which groups are skipped"
    )
    p.add_argument(
        "--call-limit", type=float, default=120.0, help="seconds before one call is interrupted"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default: 1)")
    p.add_argument("--list", action="store_true", help="list the groups and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, (_, title, budget) in GROUPS.items():
            print(f"{name:10s} {budget:4.0f} s  {title}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    default_out = "tmp/gpu_check_quick" if args.quick else "gpu_check"
    out = args.out or ROOT / "benchmarks" / "results" / default_out
    env = Env(
        device,
        quick=args.quick,
        repeats=args.repeats,
        row_seconds=args.row_seconds,
        call_limit=args.call_limit,
    )
    names = [n for n in (args.only or GROUPS) if n not in args.skip]
    start = time.perf_counter()
    payload: dict[str, Any] = {"meta": _meta(args, device), "groups": {}}
    for name in names:
        left = args.max_total - (time.perf_counter() - start)
        if left <= 0:
            _, title, budget = GROUPS[name]
            payload["groups"][name] = {
                "title": title,
                "budget_s": 0.0,
                "elapsed_s": 0.0,
                "rows": [],
                "checks": [],
                "notes": {},
                "error": {"status": "skipped", "error": f"--max-total {args.max_total:g} s spent"},
            }
            print(f"== {name}: skipped (--max-total {args.max_total:g} s spent)")
        else:
            budget = min(GROUPS[name][2] * args.budget_scale, left)
            payload["groups"][name] = run_group(name, env, budget)
        payload["total_s"] = time.perf_counter() - start
        _write(payload, out)
    print(f"total {payload.get('total_s', 0):.1f} s; written to {out}/gpu_check.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

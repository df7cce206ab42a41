"""Fitting curvature: ``pushforward.curvature`` next to BackPACK, curvlinops, laplace-torch and
laplax on the same model, weights and data.

* ``curv-diag`` — the exact diagonal GGN (softmax cross-entropy, summed) of the W1 MLP
  (784-256-256-10) over 1,024 points in batches of 256: ``GGN(model, loader).diagonal()``,
  BackPACK's ``DiagGGNExact`` (one backward per batch), laplace-torch's ``DiagLaplace.fit`` with
  its default backend (its diagonal contracts each batch's explicit Jacobian, 256 x 10 x P: run
  it with ``--time-limit 600``) and with ``backend=PushforwardGGN``, laplax's diagonal
  (below), and the same diagonal written by hand in plain PyTorch for this MLP
  (``curv-diag/torch-floor``: the fewest operations any exact method needs, no library).
* ``curv-kfac`` — K-FAC (type-2, ``"expand"``) of the same GGN: ``GGN.kfac()``, curvlinops'
  ``KFACLinearOperator.compute_kronecker_factors()`` and laplace-torch's ``KronLaplace.fit``
  (default backend, and ``backend=PushforwardGGN``).
* ``curv-lanczos`` — the 20 leading eigenpairs by 20 Lanczos steps (full reorthogonalization):
  ``GGN.lowrank(20, iterations=20)`` and laplax's ``lanczos`` (same rank, same steps).
* ``curv-llm`` — a GPT-2 architecture (6 layers, d = 512, vocabulary 50,257; random weights from
  a config) with peft LoRA r = 8 on every ``c_attn`` (the posterior's 98,304 parameters), 64
  sequences x 128 tokens in batches of 8, next-token targets: Monte Carlo K-FAC and Monte Carlo
  diagonal (one sampled target per token), ``memory_budget="2GB"``. Peak memory above the model
  is the number to read; run with ``--repeats 1 --warmup 0 --time-limit 900``.

**laplax** (JAX) runs in its own Python: set ``LAPLAX_PYTHON`` to an interpreter with
``laplax==0.0.2`` and ``jax[cpu]`` installed (see ``benchmarks/README.md``); without it these
cases record a ``Skipped`` error. The setup starts that interpreter once with the model's
weights and data (float32, the same values), JIT-compiles and warms laplax's functions, and each
timed call asks it for one more run: the time is laplax's warm computation plus a pipe round
trip; its memory is in the child process (``info["laplax_peak_rss"]``), not in the measured
peak. laplax computes a diagonal with one GGN-vector product per parameter (P = 269,322 of them,
hours here), so its case times the first ``LAPLAX_DIAG_ENTRIES`` entries with laplax's own
per-entry routine and reports the extrapolation to all P in ``info``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register
from torch import nn

from cases import workloads

#: The curvature workloads' data: points and mini-batch size.
N_POINTS, BATCH = 1024, 256
#: Diagonal entries laplax's case computes (of P).
LAPLAX_DIAG_ENTRIES = 512
#: curv-llm: layers, width, vocabulary, sequences, tokens, batch, LoRA rank.
LLM = {"layers": 6, "width": 512, "vocab": 50257, "sequences": 64, "tokens": 128, "batch": 8}
LLM_RANK = 8
LLM_MEMORY_BUDGET = "2GB"

TITLES = {
    "curv-diag": "Curvature: exact diagonal GGN, MLP 784-256-256-10 (P=269,322), 1,024 points in "
    "batches of 256",
    "curv-kfac": "Curvature: K-FAC (type-2, expand), MLP 784-256-256-10, 1,024 points in batches of "
    "256",
    "curv-lanczos": "Curvature: 20 leading GGN eigenpairs by 20 Lanczos steps, MLP 784-256-256-10, "
    "1,024 points",
    "curv-llm": "Curvature: GPT-2 (6 layers, d=512, vocab 50,257) + LoRA r=8 on c_attn, 64 sequences "
    "x 128 tokens, Monte Carlo (1 sample per token)",
}
for _key, _title in TITLES.items():
    workloads.TITLES.setdefault(_key, _title)


class Skipped(RuntimeError):
    """The case cannot run in this environment (recorded as its error message)."""


# -- the W1 data ---------------------------------------------------------------------------------
def _w1(ctx: Context):
    """``(model, loader, X, y)``: the W1 MLP in eval mode and 1,024 seeded points."""
    from torch.utils.data import DataLoader, TensorDataset

    hidden = 16 if ctx.quick else 256
    points, batch = (N_POINTS // 8, BATCH // 8) if ctx.quick else (N_POINTS, BATCH)
    torch.manual_seed(ctx.seed)
    model = workloads.mlp(hidden, 10)
    model = model.to(ctx.device).eval()
    g = torch.Generator().manual_seed(ctx.seed + 1)
    X = torch.randn(points, 784, generator=g).to(ctx.device)
    y = torch.randint(10, (points,), generator=g).to(ctx.device)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch)
    P = sum(p.numel() for p in model.parameters())
    ctx.info.update(arch=f"MLP 784-{hidden}-{hidden}-10", N=points, B=batch, K=10, P=P)
    return model, loader, X, y


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _pushforward_diagonal(
    ctx: Context, custom: bool = False, general: bool = False
) -> Callable[[], object]:
    from pushforward.curvature import GGN

    model, loader, _, _ = _w1(ctx)
    ggn = GGN(workloads.custom_mlp(model, general) if custom else model, loader)
    run = ggn.diagonal
    ctx.info["producer"] = ggn.plan("diagonal").producer
    # equal values: BackPACK's DiagGGNExact on the same data (float32)
    ctx.info["max_rel_diff_vs_backpack"] = _relative(run(), _backpack(model, loader)())
    return run


def _backpack_diagonal(ctx: Context) -> Callable[[], object]:
    model, loader, _, _ = _w1(ctx)
    return _backpack(model, loader)


def _torch_floor_diagonal(ctx: Context) -> Callable[[], object]:
    """The same exact diagonal written by hand for this MLP in plain PyTorch: no library.

    What every exact method computes at the least, in the fewest operations: one forward per
    batch, the cross-entropy Hessian's K - 1 rows per example, the rows back through each weight
    (groups of whole examples of about 512 KiB, in two workspaces), each layer's row squares
    summed straight into their slice, and the closed form ``sum_n (sum_r G_nr^2)^T x_n^2``. The
    batches are kept as tensors, as pushforward keeps a small data set after its first pass.
    """
    model, loader, _, _ = _w1(ctx)
    first, second, head = (m for m in model if isinstance(m, nn.Linear))
    (W1, b1), (W2, b2), (W3, b3) = (
        (m.weight.detach(), m.bias.detach()) for m in (first, second, head)
    )
    batches = list(loader)
    widest = max(W1.shape[0], W2.shape[0])
    rows = W3.shape[0] - 1
    examples = max(1, (512 * 2**10) // (rows * widest * 4))

    def factor(f: torch.Tensor) -> torch.Tensor:  # (b, K - 1, K): rows of diag(p) - p p^T
        p = torch.softmax(f, -1)
        s = p.sqrt()
        minus_w = p / (-1.0 - s[:, :1])
        minus_w[:, :1] = -s[:, :1]
        C = s[:, 1:, None] * minus_w[:, None, :]
        C.diagonal(offset=1, dim1=-2, dim2=-1).add_(s[:, 1:])
        return C

    def run() -> torch.Tensor:
        out = torch.zeros(sum(p.numel() for p in model.parameters()))
        sums = [
            t.view_as(p)
            for t, p in zip(
                out.split([p.numel() for p in model.parameters()]), model.parameters(), strict=True
            )
        ]
        for x, _ in batches:
            h1 = torch.addmm(b1, x, W1.T).relu_()
            h2 = torch.addmm(b2, h1, W2.T).relu_()
            L = factor(torch.addmm(b3, h2, W3.T))
            b = x.shape[0]
            S3, S2, S1 = L.square().sum(1), x.new_empty(b, W2.shape[0]), x.new_empty(b, W1.shape[0])
            e = -(-b // -(-b // examples))
            A, B = x.new_empty(e * rows * widest), x.new_empty(e * rows * widest)
            for start in range(0, b, e):
                part = slice(start, start + e)
                n = min(e, b - start) * rows
                u = torch.mm(L[part].reshape(n, -1), W3, out=A[: n * W3.shape[1]].view(n, -1))
                u3 = u.view(-1, rows, u.shape[1])
                torch.ops.aten.threshold_backward(u3, h2[part].unsqueeze(1), 0, grad_input=u3)
                v = torch.mm(u, W2, out=B[: n * W2.shape[1]].view(n, -1))
                torch.sum(u3.square_(), 1, out=S2[part])
                torch.sum(v.view(-1, rows, v.shape[1]).square_(), 1, out=S1[part])
            S1.mul_(h1 > 0)
            for S, a, (w, bias) in ((S1, x, sums[0:2]), (S2, h1, sums[2:4]), (S3, h2, sums[4:6])):
                w.addmm_(S.T, a.square())
                bias.add_(S.sum(0))
        return out

    # equal values: BackPACK's DiagGGNExact on the same data (float32)
    ctx.info["max_rel_diff_vs_backpack"] = _relative(run(), _backpack(model, loader)())
    return run


def _backpack(model: nn.Module, loader) -> Callable[[], torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    extended = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> torch.Tensor:
        total = None
        for xb, yb in loader:
            extended.zero_grad()
            loss = loss_fn(extended(xb), yb)
            with backpack(DiagGGNExact()):
                loss.backward()
            d = torch.cat([p.diag_ggn_exact.flatten() for p in extended.parameters()])
            total = d if total is None else total + d
        return total

    return run


def _laplace_fit(ctx: Context, structure: str, backend: str) -> Callable[[], object]:
    from laplace import Laplace

    model, loader, _, _ = _w1(ctx)
    kwargs = {}
    if backend == "pushforward":
        from pushforward.laplace_interop import PushforwardGGN

        kwargs = {"backend": PushforwardGGN}
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure=structure, **kwargs
    )
    ctx.info.update(laplace=type(la).__name__, backend=type(la.backend).__name__)
    return partial(la.fit, loader)


def _pushforward_kfac(ctx: Context, custom: bool = False) -> Callable[[], object]:
    from pushforward.curvature import GGN

    model, loader, _, _ = _w1(ctx)
    mine = workloads.custom_mlp(model) if custom else model
    run = GGN(mine, loader).kfac
    # equal values: every factor of curvlinops' KFAC on the same data (float32)
    ours, theirs = run(), _curvlinops(model, loader)()
    names = dict(
        zip(["0", "2", "4"], ["fc1", "fc2", "head"] if custom else ["0", "2", "4"], strict=True)
    )
    worst = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            block = ours.factors(f"{names[name]}.weight")
            worst = max(
                worst,
                _relative(block.out_factor, theirs._gradient_covariances[name]),
                _relative(block.in_factor, theirs._input_covariances[name]),
            )
    ctx.info["max_rel_diff_vs_curvlinops"] = worst
    return run


def _curvlinops_kfac(ctx: Context) -> Callable[[], object]:
    model, loader, _, _ = _w1(ctx)
    return _curvlinops(model, loader)


def _curvlinops(model: nn.Module, loader) -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    params = list(model.parameters())

    def run():
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            loader,
            fisher_type="type-2",
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        return op

    return run


def _pushforward_lanczos(ctx: Context) -> Callable[[], object]:
    from pushforward.curvature import GGN

    model, loader, _, _ = _w1(ctx)
    return partial(GGN(model, loader).lowrank, 20, iterations=20)


# -- laplax, in its own interpreter ------------------------------------------------------------
LAPLAX_SERVER = r"""
import sys, time, resource
import numpy as np
import jax, jax.numpy as jnp
from laplax.curv import create_ggn_mv, estimate_curvature
from laplax import util
from laplax.util.tree import basis_vector_from_index

path, mode, entries = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = np.load(path)
n_layers = int(data["n_layers"])
params = [(jnp.asarray(data[f"W{i}"]), jnp.asarray(data[f"b{i}"])) for i in range(n_layers)]


def model_fn(input, params):
    h = input
    for W, b in params[:-1]:
        h = jax.nn.relu(W @ h + b)
    W, b = params[-1]
    return W @ h + b


batch = {"input": jnp.asarray(data["X"]), "target": jnp.asarray(data["y"])}
ggn_mv = create_ggn_mv(model_fn, params, batch, loss_fn="cross_entropy")

if mode == "diagonal":
    def diag_elem(i):  # laplax.util.mv.diagonal's per-entry routine
        return util.tree.tree_vec_get(ggn_mv(basis_vector_from_index(i, params)), i)

    work = jax.jit(lambda idx: jax.lax.map(jax.jit(diag_elem), idx))
    index = jnp.arange(entries)

    def run():
        return jax.block_until_ready(work(index))
else:
    key = jax.random.key(0)

    def run():
        out = estimate_curvature("lanczos", mv=ggn_mv, layout=params, key=key, rank=entries)
        return jax.block_until_ready(out.U)

run()
run()
print("ready", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    start = time.perf_counter()
    run()
    print("done", time.perf_counter() - start, flush=True)
"""


def _laplax(ctx: Context, mode: str) -> Callable[[], object]:
    import numpy as np

    python = os.environ.get("LAPLAX_PYTHON")
    if not python:
        raise Skipped(
            "LAPLAX_PYTHON is not set: point it to a Python with laplax==0.0.2 and jax[cpu] (see "
            "benchmarks/README.md) to run laplax's cases"
        )
    model, _, X, y = _w1(ctx)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    arrays = {"X": X.cpu().numpy(), "y": y.cpu().numpy(), "n_layers": len(linears)}
    for i, layer in enumerate(linears):
        arrays[f"W{i}"] = layer.weight.detach().cpu().numpy()
        arrays[f"b{i}"] = layer.bias.detach().cpu().numpy()
    handle, path = tempfile.mkstemp(suffix=".npz")
    os.close(handle)
    np.savez(path, **arrays)
    threads = torch.get_num_threads()
    env = dict(os.environ)
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["OMP_NUM_THREADS"] = str(threads)
    entries = min(LAPLAX_DIAG_ENTRIES, ctx.info["P"]) if mode == "diagonal" else 20
    proc = subprocess.Popen(
        [python, "-c", LAPLAX_SERVER, path, mode, str(entries)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    ready = proc.stdout.readline().split()
    if not ready or ready[0] != "ready":
        raise RuntimeError(f"laplax's process did not start ({python}, exit {proc.poll()})")
    ctx.info.update(laplax_peak_rss=int(ready[1]), laplax_entries=entries)

    def run() -> float:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        reply = proc.stdout.readline().split()
        if not reply or reply[0] != "done":
            raise RuntimeError("laplax's process stopped")
        return float(reply[1])

    if mode == "diagonal":
        seconds = min(run() for _ in range(2))
        ctx.info.update(laplax_full_diagonal_s_extrapolated=seconds * ctx.info["P"] / entries)
    return run


# -- the LLM case --------------------------------------------------------------------------------
def _llm(ctx: Context, what: str) -> Callable[[], object]:
    from torch.utils.data import DataLoader, TensorDataset

    from pushforward.curvature import GGN, CrossEntropy

    size = dict(LLM)
    if ctx.quick:
        size.update(layers=2, width=32, vocab=1000, sequences=8, tokens=16, batch=4)
    heads = 4 if ctx.quick else 8
    model = workloads.peft_gpt2(
        ctx, size["layers"], size["width"], heads, size["vocab"], size["tokens"], LLM_RANK
    )
    g = torch.Generator().manual_seed(ctx.seed + 1)
    ids = torch.randint(0, size["vocab"], (size["sequences"], size["tokens"]), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # next token
    loader = DataLoader(
        TensorDataset(ids.to(ctx.device), targets.to(ctx.device)), batch_size=size["batch"]
    )
    op = GGN(model, loader, CrossEntropy(), mc_samples=1, memory_budget=LLM_MEMORY_BUDGET)
    ctx.info.update(
        arch=f"GPT-2 {size['layers']}x{size['width']}, vocab {size['vocab']}, LoRA r={LLM_RANK}",
        N=size["sequences"],
        T=size["tokens"],
        B=size["batch"],
        K=size["vocab"],
        P=op.num_params,
        model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )
    return op.kfac if what == "kfac" else op.diagonal


# -- registration ----------------------------------------------------------------------------------
_CASES = [
    (
        "curv-diag/pushforward",
        "curv-diag",
        "GGN(model, loader).diagonal(): layer-structured exact diagonal",
        "pushforward",
        _pushforward_diagonal,
    ),
    (
        "curv-diag/pushforward-custom",
        "curv-diag",
        "GGN(model, loader).diagonal() of the same MLP written as a custom nn.Module (its own "
        "forward, read as a chain from its autograd graph)",
        "pushforward",
        partial(_pushforward_diagonal, custom=True),
    ),
    (
        "curv-diag/pushforward-general",
        "curv-diag",
        "GGN(model, loader).diagonal() of the custom-module MLP with a no-op scale after its first "
        "activation: not a chain, so the general path (one batched backward from probes)",
        "pushforward",
        partial(_pushforward_diagonal, custom=True, general=True),
    ),
    (
        "curv-diag/backpack",
        "curv-diag",
        "BackPACK DiagGGNExact, one backward per batch",
        "backpack",
        _backpack_diagonal,
    ),
    (
        "curv-diag/torch-floor",
        "curv-diag",
        "the same exact diagonal by hand in plain PyTorch for this MLP: the computation's floor",
        "torch",
        _torch_floor_diagonal,
    ),
    (
        "curv-diag/laplace-default",
        "curv-diag",
        "laplace-torch DiagLaplace.fit, default backend (CurvlinopsGGN: explicit batch Jacobian)",
        "laplace-torch",
        partial(_laplace_fit, structure="diag", backend="default"),
    ),
    (
        "curv-diag/laplace-pushforward",
        "curv-diag",
        "laplace-torch DiagLaplace.fit with backend=PushforwardGGN",
        "pushforward",
        partial(_laplace_fit, structure="diag", backend="pushforward"),
    ),
    (
        "curv-diag/laplax",
        "curv-diag",
        f"laplax diagonal: first {LAPLAX_DIAG_ENTRIES} of P entries "
        "(one GGN-mv per entry; extrapolation in info)",
        "laplax",
        partial(_laplax, mode="diagonal"),
    ),
    (
        "curv-kfac/pushforward",
        "curv-kfac",
        "GGN(model, loader).kfac(): layer-structured K-FAC",
        "pushforward",
        _pushforward_kfac,
    ),
    (
        "curv-kfac/pushforward-custom",
        "curv-kfac",
        "GGN(model, loader).kfac() of the same MLP written as a custom nn.Module (its own "
        "forward, read as a chain from its autograd graph)",
        "pushforward",
        partial(_pushforward_kfac, custom=True),
    ),
    (
        "curv-kfac/curvlinops",
        "curv-kfac",
        "curvlinops KFACLinearOperator(fisher_type='type-2').compute_kronecker_factors()",
        "curvlinops",
        _curvlinops_kfac,
    ),
    (
        "curv-kfac/laplace-default",
        "curv-kfac",
        "laplace-torch KronLaplace.fit, default backend (curvlinops KFAC per batch)",
        "laplace-torch",
        partial(_laplace_fit, structure="kron", backend="default"),
    ),
    (
        "curv-kfac/laplace-pushforward",
        "curv-kfac",
        "laplace-torch KronLaplace.fit with backend=PushforwardGGN",
        "pushforward",
        partial(_laplace_fit, structure="kron", backend="pushforward"),
    ),
    (
        "curv-lanczos/pushforward",
        "curv-lanczos",
        "GGN(model, loader).lowrank(20, iterations=20)",
        "pushforward",
        _pushforward_lanczos,
    ),
    (
        "curv-lanczos/laplax",
        "curv-lanczos",
        "laplax estimate_curvature('lanczos', rank=20)",
        "laplax",
        partial(_laplax, mode="lanczos"),
    ),
    (
        "curv-llm/pushforward-kfac",
        "curv-llm",
        "GGN(..., mc_samples=1).kfac() on the LoRA "
        f"parameters, memory_budget={LLM_MEMORY_BUDGET!r}",
        "pushforward",
        partial(_llm, what="kfac"),
    ),
    (
        "curv-llm/pushforward-mc-diagonal",
        "curv-llm",
        "GGN(..., mc_samples=1).diagonal() on the "
        f"LoRA parameters, memory_budget={LLM_MEMORY_BUDGET!r}",
        "pushforward",
        partial(_llm, what="diagonal"),
    ),
]

for _id, _workload, _method, _library, _setup in _CASES:
    register(_id, workload=_workload, method=_method, library=_library, tags=("curvature",))(_setup)

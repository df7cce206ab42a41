"""``last_layer``: closed forms through the features when only a linear head is in the posterior.

For a head ``f = phi W^T + b`` (W of shape ``(K, d)``) the Jacobian of example n is
``[I_K ⊗ phi_n^T, I_K]``, so ``J S J^T`` needs only the features ``phi`` (one forward pass):

* diagonal S: ``var_nk = sum_i phi_ni^2 V_ki + v_k``;
* Kronecker S_W = B ⊗ A: ``cov_n = (phi_n^T A phi_n) B``; in eigen form
  ``(Q1 ⊗ Q2) diag(M) (Q1 ⊗ Q2)^T``: ``cov_n = Q1 diag(M (Q2^T phi_n)^2) Q1^T``;
* a bias block C (K x K) adds ``C``;
* any other block (dense, low-rank, ...) over the head's parameters: its rows of J are built
  explicitly from ``phi`` (cheap: no backward pass) and contracted with the operator.

The strategy applies only when it provably holds: the posterior's parameters belong to one
``nn.Linear``, not tied to any other module, called once, whose output is the model's output;
and a one-example check compares a real backward pass with the closed-form Jacobian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker import Kronecker, KroneckerEigen, KroneckerFactors
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.contraction import gram
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import Estimate, NotApplicable, Strategy

__all__ = ["LastLayerStrategy", "find_linear_head"]


def find_linear_head(fm) -> nn.Linear:
    """The ``nn.Linear`` owning every parameter of the posterior (raises NotApplicable)."""
    named = dict(fm.module.named_parameters())
    selected = {id(named[n]) for n in fm.param_names}
    owners = [
        m for m in fm.module.modules() if selected <= {id(p) for p in m.parameters(recurse=False)}
    ]
    if not owners:
        raise NotApplicable("the posterior's parameters do not all belong to one module")
    head = owners[0]
    if type(head) is not nn.Linear:
        raise NotApplicable(
            f"the posterior's parameters belong to a {type(head).__name__}, not an nn.Linear"
        )
    uses: dict[int, int] = {}
    for _, p in fm.module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    if any(uses[i] > 1 for i in selected):
        raise NotApplicable("a head parameter is tied to another module (shared weights)")
    return head


def _features(p: Problem, head: nn.Linear, inputs, params) -> tuple[Tensor, Tensor, Tensor]:
    """``(f, phi, z)``: model output, the head's input ``(n, d)`` and output ``(n, K)``."""
    seen: list[tuple[Tensor, Tensor]] = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    try:
        f = p.fm.call(params, inputs.args, inputs.kwargs)
    finally:
        hook.remove()
    if len(seen) != 1:
        raise NotApplicable(f"the head is called {len(seen)} times in one forward pass")
    phi, z = seen[0]
    n = inputs.batch_size * p.T
    if z.shape[-1] != p.K or z.numel() != n * p.K or phi.numel() != n * head.in_features:
        raise NotApplicable("the head's output is not the model's output vector")
    z = z.reshape(n, p.K)
    if not torch.equal(z.detach(), f.detach().reshape(n, p.K)):
        raise NotApplicable("the model transforms the head's output (it is not the model output)")
    return f, phi.reshape(n, head.in_features), z


def _check_jacobian(p: Problem, head: nn.Linear) -> None:
    """One example: autograd's gradient of a random projection vs the closed form."""
    one = p.inputs.slice(0, 1).detach()
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in p.fm.params(False).items()}
    with torch.enable_grad():
        f, phi, _ = _features(p, head, one, leaves)
        u = torch.randn(f.shape, dtype=f.dtype, generator=torch.Generator().manual_seed(0)).to(
            f.device
        )
        grads = torch.autograd.grad(f, list(leaves.values()), u, allow_unused=True)
    u = u.reshape(-1, p.K)
    expected = {"weight": u.T @ phi.detach(), "bias": u.sum(0)}
    for name, g in zip(leaves, grads, strict=True):
        want = expected[name.rsplit(".", 1)[-1]]
        got = torch.zeros_like(want) if g is None else g
        if (got - want).norm() > 1e-4 * (want.norm() + 1e-12):
            raise NotApplicable(f"{name} is used elsewhere in the model (its Jacobian is not phi)")


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class LastLayerStrategy(Strategy):
    name = "last_layer"

    def estimate(self, problem: Problem) -> Estimate:
        p = problem
        head = find_linear_head(p.fm)
        _check_jacobian(p, head)
        n, d, K, S = p.B * p.T, head.in_features, p.K, p.S
        generic = [g for g in p.cov.param_groups() if not _closed_form(g.operator, g.names)]
        work = n * S * d * 4.0 + n * K * d * 2.0
        memory = p.result_bytes() + n * (d + 2 * K) * p.itemsize + n * p.cost.activation_bytes
        for g in generic:
            size = g.operator.num_params
            work += n * S * (2 * size + g.operator.matmul_flops())
            memory += n * S * size * 2 * p.itemsize
        if p.kind == "joint":
            work += (n * S) ** 2 * d
        flops = p.B * p.cost.forward_flops + work
        return Estimate(
            self.name, flops, memory, n, "1 forward pass (closed form through features)"
        )

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        p = problem
        head = find_linear_head(p.fm)
        params = p.fm.params(p.differentiable)
        f, phi, _ = _features(p, head, p.inputs, params)
        n = phi.shape[0]
        idx = (
            torch.arange(p.K, device=phi.device).expand(n, p.K)
            if p.outputs is None
            else p.outputs.reshape(n, p.S)
        )
        total = None
        for group in p.cov.param_groups():
            part = _group_contribution(p, group.names, group.operator, phi, idx)
            total = part if total is None else total + part
        shape = {"variance": (p.B, p.T, p.S), "covariance": (p.B, p.T, p.S, p.S)}.get(p.kind)
        return f, total if shape is None else total.reshape(shape)


def _closed_form(op: CovarianceOperator, names: tuple[str, ...]) -> bool:
    return len(names) == 1 and isinstance(op, (Diagonal, Kronecker))


def _pairs(M: Tensor, idx: Tensor, kind: str) -> Tensor:
    """A K x K matrix read at the selected outputs: ``(n, S)`` diagonal, ``(n, S, S)``, or joint."""
    if kind == "variance":
        return M.diagonal()[idx]
    if kind == "covariance":
        return M[idx.unsqueeze(-1), idx.unsqueeze(-2)]
    flat = idx.reshape(-1)
    return M[flat.unsqueeze(-1), flat.unsqueeze(-2)]


def _same(idx: Tensor, kind: str) -> Tensor:
    """Indicator that two selected outputs are the same output (the identity read at idx)."""
    if kind == "covariance":
        return (idx.unsqueeze(-1) == idx.unsqueeze(-2)).to(torch.get_default_dtype())
    flat = idx.reshape(-1)
    return (flat.unsqueeze(-1) == flat.unsqueeze(-2)).to(torch.get_default_dtype())


def _group_contribution(
    p: Problem, names, op: CovarianceOperator, phi: Tensor, idx: Tensor
) -> Tensor:
    kind = p.kind
    if _closed_form(op, names):
        (name,) = names
        if _role(name) == "bias":
            C = op.to_dense()
            return _pairs(C, idx, kind)
        if isinstance(op, Diagonal):
            return _diagonal_weight(op.variances(name), phi, idx, kind)
        block = op.factors(name)
        if isinstance(block, KroneckerFactors):
            return _kron_weight(block, phi, idx, kind)
        if isinstance(block, KroneckerEigen):
            return _eigen_weight(block, phi, idx, kind)
    return _explicit_rows(p, names, op, phi, idx)


def _diagonal_weight(V: Tensor, phi: Tensor, idx: Tensor, kind: str) -> Tensor:
    """Diagonal S on W (K, d): only equal outputs correlate."""
    if kind == "variance":
        if idx.shape[1] == V.shape[0] and torch.equal(
            idx[0], torch.arange(V.shape[0], device=idx.device)
        ):
            return (phi * phi) @ V.T
        return torch.einsum("ni,nsi->ns", phi * phi, V[idx])
    if kind == "covariance":
        var = torch.einsum("ni,nsi->ns", phi * phi, V[idx])
        return _same(idx, kind).to(var.dtype) * var.unsqueeze(-1)
    n, S = idx.shape
    G = torch.einsum("nsi,mi->nsm", phi.unsqueeze(1) * V[idx], phi)  # (n, S, m)
    G = G.unsqueeze(-1).expand(n, S, n, S).reshape(n * S, n * S)
    return _same(idx, kind).to(G.dtype) * G


def _kron_weight(block: KroneckerFactors, phi: Tensor, idx: Tensor, kind: str) -> Tensor:
    B, A = block.out_factor, block.in_factor
    pair = _pairs(B, idx, kind)
    if kind == "variance":
        return torch.einsum("ni,ij,nj->n", phi, A, phi).unsqueeze(-1) * pair
    if kind == "covariance":
        return torch.einsum("ni,ij,nj->n", phi, A, phi)[:, None, None] * pair
    S = idx.shape[1]
    G = phi @ A @ phi.T  # (n, m)
    return G.repeat_interleave(S, 0).repeat_interleave(S, 1) * pair


def _eigen_weight(block: KroneckerEigen, phi: Tensor, idx: Tensor, kind: str) -> Tensor:
    Q1, Q2, M = block.out_eigvecs, block.in_eigvecs, block.eigvals
    psi = phi @ Q2  # (n, d): features in the input eigenbasis
    R = Q1[idx]  # (n, S, K): selected rows of the output eigenbasis
    if kind in ("variance", "covariance"):
        w = (psi * psi) @ M.T  # (n, K)
        if kind == "variance":
            return torch.einsum("nsi,ni->ns", R * R, w)
        return torch.einsum("nsi,ni,nui->nsu", R, w, R)
    H = torch.einsum("nj,mj,ij->nmi", psi, psi, M)  # (n, m, K)
    n, S = idx.shape
    return torch.einsum("nsi,nmi,mui->nsmu", R, H, R).reshape(n * S, n * S)


def _explicit_rows(p: Problem, names, op: CovarianceOperator, phi: Tensor, idx: Tensor) -> Tensor:
    """Rows of the head's Jacobian for the group ``names`` built from ``phi``, contracted."""
    n, S = idx.shape
    parts = []
    for name in names:
        if _role(name) == "weight":
            K, d = p.fm.param_shapes[name]
            rows = phi.new_zeros(n, S, K, d)
            rows.scatter_(
                2,
                idx[:, :, None, None].expand(n, S, 1, d),
                phi[:, None, None, :].expand(n, S, 1, d),
            )
            parts.append(rows.reshape(n, S, K * d))
        else:
            parts.append(torch.nn.functional.one_hot(idx, p.K).to(phi.dtype))
    J = torch.cat(parts, dim=-1)  # (n, S, P_group) in the group's flat order
    if p.kind == "variance":
        return op.quadratic_rows(J.reshape(n * S, -1)).reshape(n, S)
    if p.kind == "covariance":
        return gram(op, J)
    flat = J.reshape(n * S, -1)
    return gram(op, flat)

"""pushforward: push a weight-space Gaussian through a network linearized at its weights.

Predictive means, functional variances and covariances ``J(x) S J(x)^T``, linearized function
samples and predictive probabilities — without materializing the per-example Jacobian.

Layers of the package (each a folder): ``core`` (the functional model, inputs, parameter
layout, options, settings, the cost model, fallbacks), ``products`` (JVPs, per-example VJPs,
Jacobians, weight-space draws), ``covariance`` (one operator per module), ``engine`` (problems,
the planner, the strategies and the layer structure), ``api`` (the functions below),
``laplace_interop`` (laplace-torch), ``curvature``, and ``testing`` (brute-force references and
the operator contract, for this library's tests and yours).
"""

from pushforward import curvature, distributed
from pushforward.api.compiled import compile
from pushforward.api.predictive import RegressionPredictive, predictive
from pushforward.api.sampling import functional_samples
from pushforward.api.variance import (
    functional_covariance,
    functional_variance,
    monte_carlo_variance,
)
from pushforward.core.errors import (
    BatchCouplingError,
    DerivativeOverflowError,
    InconsistentDerivativesError,
    MemoryBudgetError,
    PushforwardFallbackWarning,
)
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.layout import ParamLayout
from pushforward.core.options import Options
from pushforward.core.settings import Settings, settings
from pushforward.covariance import (
    BlockDiagonal,
    CovarianceOperator,
    Dense,
    Diagonal,
    Isotropic,
    Kronecker,
    KroneckerEigen,
    KroneckerFactors,
    LowRank,
    LowRankPrecision,
    ParamGroup,
    Subset,
)
from pushforward.engine import Plan, plan
from pushforward.laplace_interop import accelerate, from_laplace, glm_predictive
from pushforward.persistence import load, save
from pushforward.products.jacobian import jacobian
from pushforward.products.jvp import batched_jvp, jvp
from pushforward.products.vjp import per_example_vjp

__version__ = "0.1.0"

#: laplace-torch backends, imported on first access (they subclass laplace-torch's classes).
_LAZY = ("PushforwardEF", "PushforwardGGN")


def __getattr__(name: str):
    if name in _LAZY:
        from pushforward import laplace_interop

        return getattr(laplace_interop, name)
    raise AttributeError(f"module 'pushforward' has no attribute {name!r}")


__all__ = [
    # the model and its inputs
    "FunctionalModel",
    "Inputs",
    "ParamLayout",
    # products
    "batched_jvp",
    "jacobian",
    "jvp",
    "per_example_vjp",
    # covariance operators
    "BlockDiagonal",
    "CovarianceOperator",
    "Dense",
    "Diagonal",
    "Isotropic",
    "Kronecker",
    "KroneckerEigen",
    "KroneckerFactors",
    "LowRank",
    "LowRankPrecision",
    "ParamGroup",
    "Subset",
    # pushforward of the covariance
    "Plan",
    "RegressionPredictive",
    "compile",
    "functional_covariance",
    "functional_samples",
    "functional_variance",
    "monte_carlo_variance",
    "plan",
    "predictive",
    # saving fitted posteriors (pushforward.persistence)
    "load",
    "save",
    # how computations run
    "Options",
    "Settings",
    "settings",
    # errors and warnings
    "BatchCouplingError",
    "DerivativeOverflowError",
    "InconsistentDerivativesError",
    "MemoryBudgetError",
    "PushforwardFallbackWarning",
    # curvature and Laplace posteriors (pushforward.curvature)
    "curvature",
    # data parallelism (pushforward.distributed)
    "distributed",
    # laplace-torch
    "PushforwardEF",
    "PushforwardGGN",
    "accelerate",
    "from_laplace",
    "glm_predictive",
]

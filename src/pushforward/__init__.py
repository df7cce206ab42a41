"""pushforward: push a weight-space Gaussian through a network linearized at its weights.

Predictive means, functional variances and covariances ``J(x) S J(x)^T``, linearized function
samples and predictive probabilities — without materializing the per-example Jacobian.
"""

from pushforward.api.predictive import RegressionPredictive, predictive
from pushforward.api.sampling import functional_samples
from pushforward.api.variance import (
    functional_covariance,
    functional_variance,
    monte_carlo_variance,
)
from pushforward.core.fallback import PushforwardFallbackWarning
from pushforward.core.functional_model import BatchCouplingError, FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.layout import ParamLayout
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
from pushforward.engine.planner import Plan, plan
from pushforward.laplace_interop import accelerate, from_laplace, glm_predictive
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
    "BatchCouplingError",
    "BlockDiagonal",
    "CovarianceOperator",
    "Dense",
    "Diagonal",
    "FunctionalModel",
    "Inputs",
    "Isotropic",
    "Kronecker",
    "KroneckerEigen",
    "KroneckerFactors",
    "LowRank",
    "LowRankPrecision",
    "ParamGroup",
    "ParamLayout",
    "Plan",
    "PushforwardFallbackWarning",
    "RegressionPredictive",
    "Subset",
    "accelerate",
    "batched_jvp",
    "from_laplace",
    "functional_covariance",
    "functional_samples",
    "functional_variance",
    "glm_predictive",
    "jacobian",
    "jvp",
    "monte_carlo_variance",
    "per_example_vjp",
    "plan",
    "predictive",
]

"""pushforward: push a weight-space Gaussian through a network linearized at its weights.

Predictive means, functional variances and covariances ``J(x) S J(x)^T``, linearized function
samples and predictive probabilities — without materializing the per-example Jacobian.
"""

from pushforward.fallback import PushforwardFallbackWarning
from pushforward.forward import batched_jvp, jvp
from pushforward.functional_model import BatchCouplingError, FunctionalModel
from pushforward.inputs import Inputs
from pushforward.jacobian import jacobian
from pushforward.reverse import per_example_vjp

__version__ = "0.1.0"

__all__ = [
    "BatchCouplingError",
    "FunctionalModel",
    "Inputs",
    "PushforwardFallbackWarning",
    "batched_jvp",
    "jacobian",
    "jvp",
    "per_example_vjp",
]

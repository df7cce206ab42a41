"""Curvature of a loss w.r.t. the selected parameters, and Laplace posteriors from it.

* :class:`GGN` / :class:`EmpiricalFisher` — ``P x P`` operators over a data set: matrix-free
  products, the exact (layer-structured) or Monte Carlo diagonal, K-FAC, dense, low rank;
* likelihoods: :class:`CrossEntropy` (``"classification"``), :class:`Gaussian`
  (``"regression"``), :class:`OutputHessian` (a user's output-space Hessian);
* typed results: :class:`DiagonalCurvature` and
  :class:`DenseCurvature` (tensors), :class:`LowRankCurvature` (an ``(eigenvalues,
  eigenvectors)`` tuple), :class:`KroneckerCurvature` (a Kronecker operator) — each with
  ``.covariance(prior_precision, ...)``, ``.logdet(...)`` and ``.matvec``;
* :func:`laplace_posterior`, :func:`log_marginal_likelihood`, :func:`optimize_prior_precision`
  (laplace-torch's conventions), whose covariances feed every function of the library.

Every data pass explains itself: ``print(GGN(...).plan("diagonal"))``.
"""

from pushforward.curvature.likelihoods import CrossEntropy, Gaussian, Likelihood, OutputHessian
from pushforward.curvature.operators import GGN, CurvatureOperator, EmpiricalFisher
from pushforward.curvature.passes import PassPlan
from pushforward.curvature.posterior import (
    PriorAndNoise,
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)
from pushforward.curvature.results import (
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    KroneckerCurvature,
    LowRankCurvature,
)

__all__ = [
    "GGN",
    "CrossEntropy",
    "Curvature",
    "CurvatureOperator",
    "DenseCurvature",
    "DiagonalCurvature",
    "EmpiricalFisher",
    "Gaussian",
    "KroneckerCurvature",
    "Likelihood",
    "LowRankCurvature",
    "OutputHessian",
    "PassPlan",
    "PriorAndNoise",
    "laplace_posterior",
    "log_marginal_likelihood",
    "optimize_prior_precision",
]

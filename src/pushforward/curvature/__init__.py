"""Curvature of a loss w.r.t. the selected parameters, and Laplace posteriors from it.

* :class:`GGN` / :class:`EmpiricalFisher` — ``P x P`` operators over a data set: matrix-free
  products, the exact (layer-structured) or Monte Carlo diagonal, K-FAC, dense, low rank;
* likelihoods: :class:`CrossEntropy` (``"classification"``), :class:`Gaussian`
  (``"regression"``), :class:`OutputHessian` (a user's output-space Hessian);
* :func:`laplace_posterior`, :func:`log_marginal_likelihood`, :func:`optimize_prior_precision`
  (laplace-torch's conventions), whose covariances feed every function of the library;
* :mod:`~pushforward.curvature.row_sums` — the per-batch sums behind the laplace-torch backends.
"""

from pushforward.curvature.likelihoods import CrossEntropy, Gaussian, Likelihood, OutputHessian
from pushforward.curvature.operators import GGN, CurvatureOperator, EmpiricalFisher
from pushforward.curvature.posterior import (
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)

__all__ = [
    "GGN",
    "CrossEntropy",
    "CurvatureOperator",
    "EmpiricalFisher",
    "Gaussian",
    "Likelihood",
    "OutputHessian",
    "laplace_posterior",
    "log_marginal_likelihood",
    "optimize_prior_precision",
]

"""Weight-space covariance operators Σ (P x P) over a model's flat parameter vector.

All share the interface of :class:`CovarianceOperator`, whose docstring describes the products
(as columns and as rows), the structure queries and how to write an operator; one operator per
module.
"""

from pushforward.covariance.block_diagonal import BlockDiagonal
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.isotropic import Isotropic
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.kronecker_blocks import KroneckerBlock, KroneckerEigen, KroneckerFactors
from pushforward.covariance.lowrank import LowRank
from pushforward.covariance.lowrank_precision import LowRankPrecision
from pushforward.covariance.marginal import Marginal
from pushforward.covariance.operator import CovarianceOperator, ParamGroup
from pushforward.covariance.precision_update import PrecisionUpdate
from pushforward.covariance.subset import Subset

__all__ = [
    "BlockDiagonal",
    "CovarianceOperator",
    "Dense",
    "Diagonal",
    "Isotropic",
    "Kronecker",
    "KroneckerBlock",
    "KroneckerEigen",
    "KroneckerFactors",
    "LowRank",
    "LowRankPrecision",
    "Marginal",
    "ParamGroup",
    "PrecisionUpdate",
    "Subset",
]

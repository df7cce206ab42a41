"""BoTorch models from networks with a weight-space Gaussian (needs the ``[bo]`` extra).

:class:`PushforwardModel` is a BoTorch ``Model`` whose posterior over each t-batch is the joint
Gaussian of the linearized network; :meth:`PushforwardModel.function_samples` gives pathwise
(weight-space) sample functions, :class:`PathwiseSampler` feeds them to BoTorch's MC
acquisition functions, and :class:`PathwiseThompsonSampling` / :func:`thompson_candidates`
do Thompson sampling in continuous spaces by maximizing sample functions with gradients.
"""

try:
    import botorch  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pushforward.botorch needs BoTorch 0.18 (Python >= 3.11): pip install 'pushforward[bo]'"
    ) from err

from pushforward.botorch.model import PosteriorSource, PushforwardModel
from pushforward.botorch.paths import PathwiseSampler, SamplePaths
from pushforward.botorch.thompson import PathwiseThompsonSampling, thompson_candidates

__all__ = [
    "PathwiseSampler",
    "PathwiseThompsonSampling",
    "PosteriorSource",
    "PushforwardModel",
    "SamplePaths",
    "thompson_candidates",
]

"""The engine behind ``J S J^T``: problems, the planner, the strategies and their contractions.

Other packages of the library use the engine through the names below (an import rule, checked
by ``tools/import_rules.py``, keeps its modules private):

* :func:`make_plan` / :func:`plan`, :class:`Plan` — plan (and run) a functional variance,
  covariance or joint covariance; :class:`Compiled` — a plan captured for repeated calls;
* :class:`Problem` — what is asked, with its costs and budget;
* :func:`pushed_columns` — the forward strategy's columns ``J L e_j`` (or ``J e_j``);
* :func:`monte_carlo_chunks` — the Monte Carlo strategy's chunks of pushed samples;
* :data:`STRATEGY_NAMES` — the strategies a caller may name.
"""

from pushforward.engine.planner import Plan, make_plan, plan
from pushforward.engine.problem import Problem
from pushforward.engine.replay import Compiled, executed
from pushforward.engine.strategies import STRATEGIES
from pushforward.engine.strategies.forward import pushed_columns
from pushforward.engine.strategies.monte_carlo import MonteCarloStrategy

#: The strategies a caller may name (besides ``"auto"``).
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
#: The Monte Carlo strategy's name.
MONTE_CARLO = MonteCarloStrategy.name


def monte_carlo_chunks(found: Plan):
    """Yield ``(f, W)`` chunk by chunk of a Monte Carlo plan.

    ``W (c, B, T, K)`` holds the chunk's pushed samples ``J L z_i`` (see
    ``pushforward.engine.strategies.monte_carlo.MonteCarloStrategy``).
    """
    return MonteCarloStrategy().chunks(found.problem, found.estimate)


__all__ = [
    "MONTE_CARLO",
    "Compiled",
    "executed",
    "STRATEGY_NAMES",
    "Plan",
    "Problem",
    "make_plan",
    "monte_carlo_chunks",
    "plan",
    "pushed_columns",
]

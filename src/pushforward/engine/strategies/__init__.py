"""Strategies for ``J S J^T``; each one module, each exact unless it says otherwise."""

from pushforward.engine.strategies.explicit import ExplicitStrategy
from pushforward.engine.strategies.forward import ForwardStrategy
from pushforward.engine.strategies.monte_carlo import MonteCarloStrategy
from pushforward.engine.strategies.reverse import ReverseStrategy
from pushforward.engine.strategies.strategy import Estimate, NotApplicable, Strategy
from pushforward.engine.strategies.structured import LastLayerStrategy, StructuredStrategy

#: Registry used by the planner, in the order they are considered (ties go to the first).
#: ``last_layer`` is the structured strategy's one-forward case (every posterior parameter on the
#: linear head), by name: same code, same closed forms.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        LastLayerStrategy(),
        StructuredStrategy(),
        ForwardStrategy(),
        ReverseStrategy(),
        ExplicitStrategy(),
        MonteCarloStrategy(),
    )
}

__all__ = ["STRATEGIES", "Estimate", "NotApplicable", "Strategy"]

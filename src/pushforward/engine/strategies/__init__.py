"""Strategies for ``J S J^T``; each one module, each exact unless it says otherwise."""

from pushforward.engine.strategies.explicit import ExplicitStrategy
from pushforward.engine.strategies.forward import ForwardStrategy
from pushforward.engine.strategies.last_layer import LastLayerStrategy
from pushforward.engine.strategies.monte_carlo import MonteCarloStrategy
from pushforward.engine.strategies.reverse import ReverseStrategy
from pushforward.engine.strategies.strategy import Estimate, NotApplicable, Strategy
from pushforward.engine.strategies.structured import StructuredStrategy

#: Registry used by the planner, in the order they are considered.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        ExplicitStrategy,
        ReverseStrategy,
        ForwardStrategy,
        LastLayerStrategy,
        MonteCarloStrategy,
        StructuredStrategy,
    )
}

__all__ = ["STRATEGIES", "Estimate", "NotApplicable", "Strategy"]

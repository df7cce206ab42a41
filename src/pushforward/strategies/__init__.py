"""Strategies for ``J S J^T``; each one module, each exact unless it says otherwise."""

from pushforward.strategies.base import Estimate, NotApplicable, Strategy
from pushforward.strategies.explicit import ExplicitStrategy
from pushforward.strategies.forward import ForwardStrategy
from pushforward.strategies.last_layer import LastLayerStrategy
from pushforward.strategies.monte_carlo import MonteCarloStrategy
from pushforward.strategies.reverse import ReverseStrategy
from pushforward.strategies.structured import StructuredStrategy

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

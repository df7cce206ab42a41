"""Curvature of a loss w.r.t. the selected parameters, from per-example Jacobian products."""

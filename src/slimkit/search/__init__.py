"""Constraint-driven search over technique pipelines (``slimkit.optimize``)."""

from slimkit.search.optimize import optimize
from slimkit.search.result import OptimizeResult, read_result
from slimkit.search.worker import work

__all__ = ["OptimizeResult", "optimize", "read_result", "work"]

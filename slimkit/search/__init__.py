"""Constraint-driven search over technique pipelines (``slimkit.optimize``)."""

from slimkit.search.optimize import OptimizeResult, optimize, read_result
from slimkit.search.space import STAGES, SearchContext, Technique, register_technique, techniques
from slimkit.search.worker import work

__all__ = ["OptimizeResult", "STAGES", "SearchContext", "Technique", "optimize", "read_result", "register_technique",
           "techniques", "work"]

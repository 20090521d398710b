"""Constraint-driven search over technique pipelines (``slimkit.optimize``)."""

# Load the built-in technique module first: its name would otherwise replace the ``techniques``
# function below as this package's attribute whenever it is first imported later.
import slimkit.search.techniques  # noqa: F401  (registers the built-in techniques)
from slimkit.search.optimize import OptimizeResult, optimize, read_result
from slimkit.search.space import STAGES, SearchContext, Technique, register_technique, techniques
from slimkit.search.worker import work

__all__ = ["OptimizeResult", "STAGES", "SearchContext", "Technique", "optimize", "read_result", "register_technique",
           "techniques", "work"]

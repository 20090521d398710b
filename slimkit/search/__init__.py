"""Constraint-driven search over technique pipelines (``slimkit.optimize``)."""

from slimkit.search.space import STAGES, SearchContext, Technique, register_technique, techniques

__all__ = ["STAGES", "SearchContext", "Technique", "register_technique", "techniques"]

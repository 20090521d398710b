"""Model graphs: dependency groups of coupled layers, shared by pruning and factorization."""

from __future__ import annotations

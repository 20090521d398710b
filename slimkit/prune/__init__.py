"""Pruning: unstructured magnitude, structured channels/heads with dependency groups, N:M, schedules."""

from __future__ import annotations

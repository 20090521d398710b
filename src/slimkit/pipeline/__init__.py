"""Recipes and the one path that applies them, measures the result and writes it."""

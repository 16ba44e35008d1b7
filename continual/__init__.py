"""Continual learning for fedadapt: forgetting metrics (and, later, methods)."""

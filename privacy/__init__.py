"""Differential privacy for fedadapt: Opacus DP-SGD wiring and privacy accounting."""

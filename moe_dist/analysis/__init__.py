"""Analytic costs (FLOPs, memory, communication bytes) and experiment grids."""

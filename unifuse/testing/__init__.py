"""Exact oracles for tests and benchmarks (GAUSSIAN_ORACLE.md)."""
from .oracle import GaussianMixture, OracleNet

__all__ = ["GaussianMixture", "OracleNet"]

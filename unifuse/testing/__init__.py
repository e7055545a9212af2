"""Exact oracles for tests and benchmarks (GAUSSIAN_ORACLE.md)."""
from .counting import CountingNet
from .oracle import GaussianMixture, OracleNet

__all__ = ["CountingNet", "GaussianMixture", "OracleNet"]

"""Prediction kinds and the exact conversions between them (NOTATION sections 6 and 8)."""
from .convert import KINDS, PRECONDITIONED, Coefficients, coefficients, convert, from_pair, to_pair
from .precond import consistency_scalings, input_scale, x0_from_raw

__all__ = ["KINDS", "PRECONDITIONED", "Coefficients", "coefficients", "convert", "from_pair", "to_pair",
           "consistency_scalings", "input_scale", "x0_from_raw"]

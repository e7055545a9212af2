"""Prediction kinds and the exact conversions between them (NOTATION sections 6 and 8)."""
from .convert import KINDS, PRECONDITIONED, Coefficients, coefficients, convert, from_pair, to_pair
from .kinds import CONVERTIBLE, PREDICTIONS, defined_at_zero_snr, model_pair, safe_div, safe_pair, valid_times
from .precond import consistency_scalings, input_scale, x0_from_raw

__all__ = ["KINDS", "PRECONDITIONED", "PREDICTIONS", "CONVERTIBLE", "Coefficients", "coefficients", "convert",
           "from_pair", "to_pair", "defined_at_zero_snr", "model_pair", "safe_div", "safe_pair", "valid_times",
           "consistency_scalings", "input_scale", "x0_from_raw"]

"""Old home of thresholding, now `unifuse.guidance.thresholding`; re-exported so `uf.thresholding.threshold` works."""
from .guidance.thresholding import Thresholded, threshold

__all__ = ["Thresholded", "threshold"]

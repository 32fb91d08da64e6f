"""What can go wrong in an estimate, as exception types a caller can catch."""

from __future__ import annotations

__all__ = ["AllChainsDivergedError", "NonFiniteCurvatureError", "NonFiniteLossError"]


class AllChainsDivergedError(RuntimeError):
    """Every SGLD chain produced a non-finite or exploding loss."""


class NonFiniteLossError(ValueError):
    """The loss is NaN or infinite at w*, or the model itself returns NaN near w*."""


class NonFiniteCurvatureError(RuntimeError):
    """The automatic step size found no finite curvature of the loss (see the message)."""

"""The one closeness check of the test suite: relative RMS error with an absolute floor, non-finite values rejected.

``relative_rms_error(actual, expected, floor) = rms(actual - expected) / max(rms(expected), floor)``, in fp64. The
floor makes a tensor that is zero in exact arithmetic (a gradient that cancels) compare as rounding noise rather than
as an infinite relative error; tolerances are stated per tensor by each test.
"""

from __future__ import annotations

import torch


def relative_rms_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-6) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    assert torch.isfinite(expected).all(), "non-finite reference values"
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).pow(2).mean().sqrt().item()
    return diff / max(expected.pow(2).mean().sqrt().item(), floor)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, *, floor: float = 1e-6,
                 name: str = "") -> None:
    """``relative_rms_error(actual, expected, floor) <= tol``; the message names the tensor."""
    try:
        err = relative_rms_error(actual, expected, floor)
    except AssertionError as error:
        raise AssertionError(f"{name}: {error}") from None
    assert err <= tol, f"{name}: relative RMS error {err:.2e} > {tol:.1e}"

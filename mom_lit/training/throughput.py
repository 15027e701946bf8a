"""Rolling tokens/s and MFU from host timestamps: no device synchronisation of its own."""

from __future__ import annotations

import time
from collections import deque

import torch
from lightning.fabric.utilities.throughput import get_available_flops

_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    """Dtype of the matmuls under a Trainer precision string ('bf16-mixed', '16-true', '32-true', ...)."""
    return _PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)


class TokenThroughput:
    """Tokens per second over the last ``window`` updates, and model FLOPs utilisation when the peak is known.

    Timestamps are taken on the host when a step returns. Without a synchronisation they may run ahead of the
    device by a step or two; averaged over the window this is negligible, and a training loop that reads its
    loss back (progress bar, logging) stays in step anyway.
    """

    def __init__(self, window: int, flops_per_token: float | None = None, peak_flops: float | None = None):
        if window < 2:
            raise ValueError(f"window must be >= 2 (a rate needs two timestamps), got {window}")
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)

    @classmethod
    def for_device(cls, window: int, flops_per_token: float | None, device: torch.device,
                   precision: str) -> "TokenThroughput":
        peak = get_available_flops(device, compute_dtype(precision)) if device.type != "cpu" else None
        return cls(window, flops_per_token, peak)

    def update(self, tokens_seen: int, now: float | None = None) -> None:
        """Record the cumulative number of tokens (all devices) processed so far."""
        self._samples.append((time.perf_counter() if now is None else now, tokens_seen))

    def reset(self) -> None:
        self._samples.clear()

    def compute(self, world_size: int = 1) -> dict[str, float]:
        """``tokens_per_sec`` (all devices) and, with a FLOPs estimate and a known peak, ``mfu``."""
        if len(self._samples) < 2:
            return {}
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return {}
        rate = (n1 - n0) / (t1 - t0)
        metrics = {"tokens_per_sec": rate}
        if self.flops_per_token is not None and self.peak_flops:
            metrics["mfu"] = rate * self.flops_per_token / (self.peak_flops * world_size)
        return metrics

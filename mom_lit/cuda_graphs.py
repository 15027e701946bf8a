"""Capture of a piece of GPU work as one CUDA graph, replayed without launching its kernels from Python."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["capture_cuda_graph"]

T = TypeVar("T")


def capture_cuda_graph(fn: Callable[[], T], device: torch.device | str | None = None,
                       warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` captured once as a CUDA graph on ``device`` (the current CUDA device when None); returns the graph
    and what the captured call returned (static tensors that every ``graph.replay()`` overwrites).

    ``fn`` first runs ``warmup`` times on a side stream, as capture requires: that compiles its kernels, sets up
    library handles and lets the caching allocator settle outside the capture. Those runs are real calls: a caller
    whose ``fn`` updates state in place restores it afterwards. The capture fails if ``fn`` synchronises with the
    host, so a successful capture also shows that ``fn`` never does.

    The graph reads and writes the tensors that ``fn`` touched at their captured addresses: keep ``fn``'s inputs
    (and anything else it reads that was allocated outside the capture) alive for as long as the graph is replayed.
    Freed, their memory may be handed to other tensors, and the replays would silently read those.
    """
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (capture needs a warmed-up call), got {warmup}")
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out

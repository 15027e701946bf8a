"""What the benchmark tools share: timing (one candidate, or several in turn over rounds), peak memory, table cells
and rows, the model sizes they time, fla's availability and its timing-only Hopper-guard lift, and the SDPA
attention baseline.

Every option is an argument: nothing here keeps or changes module state of its own or of ``mom_lit``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GIB = 2 ** 30


# --------------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_cached(device: str) -> None:
    """Hand the caching allocator's free blocks back (CUDA), so that the next candidate starts from what is alive."""
    if device == "cuda":
        torch.cuda.empty_cache()


def bench(fn: Callable[[], object], device: str, rep_ms: int = 500, warmup_ms: int | None = None, warmup: int = 3,
          reps: int = 10) -> float:
    """Median milliseconds of ``fn()``. CUDA: ``triton.testing.do_bench`` over ``rep_ms`` ms of repeats after
    ``warmup_ms`` ms (default ``min(100, rep_ms)``); elsewhere (smoke runs) ``reps`` timed calls after ``warmup``."""
    if device == "cuda":
        import triton.testing

        warmup_ms = min(100, rep_ms) if warmup_ms is None else warmup_ms
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def mean_ms(fn: Callable[[], object], device: str, calls: int, warmup: int) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` back-to-back calls after ``warmup`` untimed ones (the device
    synchronised before and after): the time of a loop, host work included."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls * 1e3


def bench_rounds(fns: dict[str, Callable[[], object]], rounds: int,
                 time_one: Callable[[Callable[[], object]], float]) -> dict[str, list[float] | str]:
    """Milliseconds of every ``fns[name]()`` per round, each measured by ``time_one(fn)``: each round times every
    candidate once, in turn, so that a drift of the host or of the clocks during the run reaches every candidate
    alike instead of favouring those timed first. A candidate that fails is reported as an error string and left
    out of the later rounds."""
    times: dict[str, list[float] | str] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if isinstance(times[name], str):
                continue
            try:
                times[name].append(time_one(fn))
            except Exception as e:  # one failing candidate must not hide the others
                times[name] = error_cell(e)
    return times


# --------------------------------------------------------------------------------------------------- memory
def peak_memory_gib(fn: Callable[[], object], device: str, above_start: bool = False) -> float | None:
    """Peak allocated GiB during ``fn()`` on CUDA (None elsewhere); with ``above_start``, above what was allocated
    before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if above_start else 0
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


# --------------------------------------------------------------------------------------------------- tables
def error_cell(error: Exception) -> str:
    """The table cell of a candidate that failed: its error, shortened (one failure must not hide the others)."""
    return f"error: {type(error).__name__}: {str(error)[:80]}"


def format_ms(times: list[float] | str, digits: int = 2) -> str:
    """Median milliseconds, with the range over the rounds when there were several."""
    if isinstance(times, str):
        return times
    median = f"{statistics.median(times):.{digits}f} ms"
    return median if len(times) == 1 else f"{median} ({min(times):.{digits}f}-{max(times):.{digits}f})"


def table_row(cells: Sequence[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(map(str, cells)) + " |"


def table_header(columns: Sequence[str]) -> list[str]:
    """A markdown table's header row and separator."""
    return [table_row(columns), "|" + "---|" * len(columns)]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def parse_shape(text: str) -> tuple[int, int]:
    """``"8x2048"`` -> (8, 2048); anything else raises the ArgumentTypeError that argparse reports as a usage
    error naming the option."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected BxT with positive integers, such as 8x2048, got {text!r}")
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------------------------------- models
def model_dims(tiny: bool) -> dict:
    """The MoMConfig sizes of the timed models: 12 layers, hidden 1024, 4 heads x 256, vocab 32000 (the reference
    setting); ``tiny`` for CPU smoke runs."""
    if tiny:
        return dict(hidden_size=64, num_heads=2, head_dim=16, num_layers=2, vocab_size=512)
    return dict(hidden_size=1024, num_heads=4, head_dim=256, num_layers=12, vocab_size=32000)


def checkpoint_blocks(model):
    """Every block of a MoM model recomputed in the backward, as ``MoMLightningModule(activation_checkpointing=True)``
    does; returns the model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from mom_lit.model import MoMBlock

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, MoMBlock))
    return model


# --------------------------------------------------------------------------------------------------- fla
def fla_available() -> bool:
    try:
        import fla  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def fla_hopper_guard_lifted(lift: bool = True) -> Iterator[None]:
    """Inside: fla 0.6's refusal of its gated backward on Hopper with Triton < 3.7.1 (where that compiler gives it
    a wrong dk) lifted, when ``lift`` and fla is importable. The kernels' work is the same, so their speed can be
    timed; their numbers are not to be trusted. fla offers no option for this: its flag is set for the duration
    and restored after."""
    if not (lift and fla_available()):
        yield
        return
    import fla.ops.common.chunk_o as chunk_o

    before = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = before


# --------------------------------------------------------------------------------------------------- SDPA
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, nh, T, hd) with cos/sin (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SDPAAttention(nn.Module):
    """The attention baseline: qkv projection, causal ``scaled_dot_product_attention`` over ``heads`` heads (16 x 64
    at hidden 1024), output projection. Optionally rotary positions and a preallocated KV cache (decoding)."""

    def __init__(self, hidden: int, heads: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int | None = 0,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D). Without ``cache``: causal attention over x. With ``cache`` = (k, v) buffers (B, nh, max_len,
        hd): prefill (start=0, T tokens) or one step at python ``start`` (attends over the filled part), or at
        device ``pos`` (start=None: attends over the whole buffer under a mask, static shapes)."""
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x(B,nh,T,hd)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif start is None:
            k_cache, v_cache = cache
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
            mask = torch.arange(k_cache.shape[2], device=x.device) <= pos  # (max_len,)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[None, None, None, :])
        else:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + seq_len] = k
            v_cache[:, :, start:start + seq_len] = v
            keys, values = k_cache[:, :, :start + seq_len], v_cache[:, :, :start + seq_len]
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=seq_len > 1)  # prefill: start = 0
        return self.out(y.transpose(1, 2).reshape(batch, seq_len, hidden))

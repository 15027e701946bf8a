"""Launch settings and the row-block helper shared by the Triton kernels of the slot and mix stages.

Programs cover whole heads of D channels over a block of rows; row offsets are int64 (slots x channels overflows
int32 at MoM sizes). The settings are explicit arguments of every stage function (``launch=``; None: the library's
``DEFAULT_LAUNCH``), never module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

__all__ = ["DEFAULT_LAUNCH", "StageLaunch", "StageLaunchConfig", "launch_config", "row_block"]


@dataclass(frozen=True)
class StageLaunch:
    """Rows per program (per loop step for ``conv_bwd_dx``) and warps (0: by the program's width, 4 for up to 128
    channels, else 8)."""

    rows: int = 32
    num_warps: int = 0


@dataclass(frozen=True)
class StageLaunchConfig:
    """Launch settings of the slot and mix kernels: the fastest of a sweep by ``tools/bench_stages.py`` on an H200
    (bf16, 8 x 2048 tokens, 4 heads x 256; BENCHMARKS.md)."""

    conv_fwd: StageLaunch = StageLaunch(16, 4)
    conv_bwd_pre: StageLaunch = StageLaunch(16, 4)
    conv_bwd_dx: StageLaunch = StageLaunch(32, 4)
    dx_channels: int = 64  # channels per conv_bwd_dx program
    dx_span: int = 512  # rows walked by one conv_bwd_dx program (its filter gradient is reduced once)
    # "taps": the transposed convolution and filter gradient one tap at a time on (rows, channels) tiles, for
    # widths up to 4; "tiles": all taps at once on (taps, rows, channels) tiles, any width
    dx_kernel: str = "taps"
    mix_fwd: StageLaunch = StageLaunch(8, 8)
    mix_bwd: StageLaunch = StageLaunch(8, 2)
    slot_sum: StageLaunch = StageLaunch(16, 4)
    slot_sum_channels: int = 256  # channels per slot_sum program

    def __post_init__(self) -> None:
        if self.slot_sum_channels < 16 or self.slot_sum_channels & (self.slot_sum_channels - 1):
            raise ValueError(f"slot_sum_channels must be a power of two >= 16, got {self.slot_sum_channels}")
        if self.dx_kernel not in ("taps", "tiles"):
            raise ValueError(f"dx_kernel must be 'taps' or 'tiles', got {self.dx_kernel!r}")
        if self.dx_span % self.conv_bwd_dx.rows:  # a step past a span's end would count rows twice
            raise ValueError(f"dx_span ({self.dx_span}) must be a multiple of conv_bwd_dx.rows "
                             f"({self.conv_bwd_dx.rows})")


DEFAULT_LAUNCH = StageLaunchConfig()
"""The library's launch settings (``launch=None`` in every stage function)."""


@triton.jit
def row_block(num_rows, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """This program's block: rows pid_t * BT .. + BT of ``num_rows``, the D columns of head program_id(1).

    Returns pid_t, row offsets (BT,), column offsets within the head (BD,), their masks, the (BT, BD) mask and the
    head's columns (BD,) in the (rows, heads x D) layout.
    """
    pid_t, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    mask_t, mask_d = offs_t < num_rows, offs_d < D
    return pid_t, offs_t, offs_d, mask_t, mask_d, mask_t[:, None] & mask_d[None, :], head * D + offs_d


def launch_config(D: int, launch: StageLaunch) -> tuple[int, int, int]:
    """(rows, head block, warps) of a kernel whose programs cover whole heads of D channels."""
    bd = triton.next_power_of_2(D)
    return launch.rows, bd, launch.num_warps or (4 if bd <= 128 else 8)

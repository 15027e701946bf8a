"""What the slot, mix and layer kernel tests share: where the kernels run, the dtypes, launch settings that split
the test shapes into several blocks, routings and the error measure. Import it after ``pytest.importorskip("triton")``.
"""

from __future__ import annotations

import os

import pytest
import torch
from closeness import relative_rms_error

from mom_lit.ops.stage_launch import StageLaunch, StageLaunchConfig

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NATIVE = torch.cuda.is_available()
kernels = pytest.mark.skipif(not (NATIVE or INTERPRETED), reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if NATIVE else "cpu"
# fp32 everywhere the kernels run; bf16 natively on a GPU only (the interpreter mishandles bf16)
bf16_native = pytest.mark.skipif(not NATIVE, reason="the interpreter mishandles bf16")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16", marks=bf16_native)]

# Launch settings: the library's, and small blocks that split these test shapes into several row blocks, spans and
# channel blocks (a span of 24 rows walked in steps of 8, 16 channels per program), so the boundaries are tested.
SMALL_LAUNCH = StageLaunchConfig(
    conv_fwd=StageLaunch(8, 2), conv_bwd_pre=StageLaunch(16, 4),
    conv_bwd_dx=StageLaunch(8, 2), dx_channels=16, dx_span=24,
    mix_fwd=StageLaunch(8, 2), mix_bwd=StageLaunch(16, 4),
    slot_sum=StageLaunch(8, 2), slot_sum_channels=16)
LAUNCHES = {"default-launch": None, "small-launch": SMALL_LAUNCH}


@pytest.fixture(params=list(LAUNCHES))
def launch(request):
    """Each kernel test once with the library's launch settings and once with the small blocks."""
    return LAUNCHES[request.param]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error with an absolute floor of 1e-3 on the reference's norm: a gradient that is zero in exact
    arithmetic (the router's with top-1 routing) compares as rounding noise."""
    return relative_rms_error(a, b, floor=1e-3 / max(b.numel(), 1) ** 0.5)  # the norm's floor as an RMS floor


def routing(num_tokens, num_memories, topk, generator):
    """(N_tok, topk + 1) memories of each token, the shared memory last; one memory gets many tokens, another may
    get none."""
    scores = torch.rand(num_tokens, num_memories, generator=generator)
    scores[: num_tokens // 3, -1] = 2.0
    memory = scores.topk(topk, -1).indices
    return torch.cat([memory, torch.full_like(memory[:, :1], num_memories)], 1)  # + shared memory

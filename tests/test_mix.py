"""The mix stage (``mom_lit.ops.mix.mix_gated_rms_norm``: each token's slot outputs weighted and summed, then the
gated RMSNorm) against unsort, sum and ``GatedRMSNorm`` in float64, through the public function with explicit launch
settings: output and every gradient.

The kernels run natively on a GPU; on CPU ``tests/test_triton_interpreter.py`` reruns this file under
``TRITON_INTERPRET=1`` in a fresh process (the interpreter must be active before Triton is first used).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the mix stage's fast path is Triton kernels (triton is not installed)")

# launch: a fixture (each test with the library's launch settings and with small blocks)
from stage_cases import DEVICE, DTYPES, kernels, launch, rel_err, routing  # noqa: E402,F401

from mom_lit.layout import build_layout, sequence_ids, unsort  # noqa: E402
from mom_lit.norm import GatedRMSNorm  # noqa: E402
from mom_lit.ops.mix import mix_gated_rms_norm  # noqa: E402


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots,heads,dim,gated", [
    pytest.param(3, 2, 16, True, id="J3-gated"),
    pytest.param(1, 3, 24, False, id="J1-ungated-D24"),
])
def test_mix_stage_matches_unsort_sum_and_gated_norm(dtype, slots, heads, dim, gated, launch):
    gen = torch.Generator().manual_seed(42)
    num_tokens = 45
    memory = routing(num_tokens, 4, slots - 1, gen) if slots > 1 else torch.zeros(num_tokens, 1, dtype=torch.long)
    layout = build_layout(memory, sequence_ids(3, 15, None, "cpu"), 3, 5)
    rank = layout.rank.to(DEVICE)
    norm = GatedRMSNorm(dim, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    o = torch.randn(num_tokens * slots, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = torch.rand(num_tokens, slots, generator=gen).to(DEVICE).requires_grad_()
    gate = torch.randn(num_tokens, heads, dim, generator=gen).to(DEVICE, dtype).requires_grad_() if gated else None
    dout = torch.randn(num_tokens, heads, dim, generator=gen).to(DEVICE, dtype)
    inputs = [t for t in (o, weight, gate, norm.weight) if t is not None]
    fast = mix_gated_rms_norm(o, rank, weight, gate, norm.weight, norm.eps, launch=launch)
    fast_grads = torch.autograd.grad(fast, inputs, dout)
    layout = type(layout)(**{k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in vars(layout).items()})
    # The reference runs in float64 on the (upcast) inputs for both dtypes: a bf16 reference would carry rounding
    # noise of its own, which dominates the router weight's gradient where it is near zero in exact arithmetic
    # (one slot: the norm cancels the weight's scale).
    up = lambda t: t.double()  # noqa: E731
    per_token = unsort(up(o), layout).view(num_tokens, slots, heads, dim)
    mixed = (per_token * up(weight)[:, :, None, None].to(per_token.dtype)).sum(1)
    ref_norm = GatedRMSNorm(dim, eps=1e-5).to(DEVICE, mixed.dtype)
    ref_norm.weight = torch.nn.Parameter(up(norm.weight.detach()))
    ref = ref_norm(mixed, None if gate is None else up(gate))
    ref_grads = torch.autograd.grad(ref, [t for t in (o, weight, gate) if t is not None] + [ref_norm.weight], up(dout))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert fast.dtype == dtype
    assert rel_err(fast, ref) < tol
    for name, a, b in zip(["do", "dweight", "dgate", "dnorm"] if gated else ["do", "dweight", "dnorm"], fast_grads,
                          ref_grads):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))

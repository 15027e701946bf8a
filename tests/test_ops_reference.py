"""Reference forms of the memory recurrence: recurrent (fp64 oracle) -> chunked eager -> chunked compiled.

Every comparison covers outputs, final states and the gradients of every input.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from closeness import assert_close

from mom_lit.ops.scan import chunk_scan, recurrent_scan, scan
from mom_lit.ops.scan import dispatch
from mom_lit.ops.scan.chunk import scalar_decays, segsum

# rule -> which optional inputs it takes; "delta_per_key" (per-key gate + delta rule) is also supported by the op
RULES: dict[str, tuple[str, ...]] = {
    "gated_delta": ("g", "beta"),
    "delta": ("beta",),
    "simple_gla": ("g",),
    "gla": ("gk",),
    "linear": (),
    "delta_per_key": ("gk", "beta"),
}
INPUTS = ("q", "k", "v", "g", "gk", "beta", "initial_state")

# Relative RMS tolerances, stated once: fp32 chunked vs fp64 oracle, and compiled vs eager (both fp32).
TOL_CHUNK = 1e-4
TOL_COMPILED = 1e-4
RMS_FLOOR = 1e-6  # absolute floor of the reference RMS, for (near-)zero references

H, K, V = 2, 16, 8


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine thread barriers dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(rule: str, batch: int, seq_len: int, num_states: int, *, seed: int = 42,
                gate: str = "normal", dtype: torch.dtype = torch.float32,
                key_dim: int = K, value_dim: int = V, heads: int = H) -> dict[str, torch.Tensor]:
    """Leaf tensors (requires_grad) for ``rule``; keys are L2-normalised as the layer does."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def log_gate(*shape: int) -> torch.Tensor:
        if gate == "near_zero":
            return -1e-4 * torch.rand(*shape, generator=gen, dtype=dtype)
        if gate == "very_negative":
            return -20.0 - torch.rand(*shape, generator=gen, dtype=dtype)
        if gate == "mixed":  # alternating forgetting and remembering
            return torch.where(torch.rand(*shape, generator=gen, dtype=dtype) < 0.3, torch.tensor(-20.0, dtype=dtype),
                               torch.tensor(-1e-3, dtype=dtype))
        return F.logsigmoid(randn(*shape) + 2.0)

    inputs = {
        "q": randn(batch, seq_len, heads, key_dim),
        "k": F.normalize(randn(batch, seq_len, heads, key_dim), dim=-1),
        "v": randn(batch, seq_len, heads, value_dim),
        "initial_state": randn(num_states, heads, key_dim, value_dim),
    }
    if "g" in RULES[rule]:
        inputs["g"] = log_gate(batch, seq_len, heads)
    if "gk" in RULES[rule]:
        inputs["gk"] = log_gate(batch, seq_len, heads, key_dim)
    if "beta" in RULES[rule]:
        inputs["beta"] = torch.rand(batch, seq_len, heads, generator=gen, dtype=dtype)
    return {name: t.requires_grad_() for name, t in inputs.items()}


def run_with_grads(fn, inputs: dict[str, torch.Tensor], seed: int = 7, **kwargs) -> dict[str, torch.Tensor]:
    """Outputs, final states and input gradients of a random linear loss of (o, final_state)."""
    o, final = fn(inputs["q"], inputs["k"], inputs["v"], **{n: inputs.get(n) for n in INPUTS[3:]}, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return {"o": o, "final_state": final, **{f"d{name}": grad for name, grad in zip(inputs, grads)}}


def as_float64(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().double().requires_grad_() for name, t in inputs.items()}


def check_all(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor], tol: float, what: str) -> None:
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(out[name], ref[name], tol, floor=RMS_FLOOR, name=f"{what} {name}")


# --- chunked (eager) vs the fp64 token-by-token oracle ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("seq_len", [1, 7, 63, 65, 200])
@pytest.mark.parametrize("rule", list(RULES))
def test_chunk_matches_recurrent(rule: str, seq_len: int, chunk_size: int) -> None:
    inputs = make_inputs(rule, batch=2, seq_len=seq_len, num_states=2)
    ref = run_with_grads(recurrent_scan, as_float64(inputs))
    out = run_with_grads(chunk_scan, inputs, chunk_size=chunk_size)
    assert out["o"].dtype == torch.float32 and out["final_state"].dtype == torch.float32
    check_all(ref, out, TOL_CHUNK, f"{rule} T={seq_len} C={chunk_size}")


VARLEN_LENGTHS = [
    pytest.param([0, 1, 63, 0, 65, 7, 1, 130], id="mixed-with-empty"),
    pytest.param([200], id="single"),
    pytest.param([0, 0, 3], id="leading-empty"),
    pytest.param([5, 0, 0], id="trailing-empty"),
]


@pytest.mark.parametrize("lengths", VARLEN_LENGTHS)
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("rule", list(RULES))
def test_chunk_varlen_matches_recurrent(rule: str, chunk_size: int, lengths: list[int]) -> None:
    offsets = torch.tensor([0] + lengths).cumsum(0)
    inputs = make_inputs(rule, batch=1, seq_len=sum(lengths), num_states=len(lengths), seed=3)
    ref = run_with_grads(recurrent_scan, as_float64(inputs), cu_seqlens=offsets)
    out = run_with_grads(chunk_scan, inputs, cu_seqlens=offsets.to(torch.int32), chunk_size=chunk_size)
    check_all(ref, out, TOL_CHUNK, f"{rule} varlen C={chunk_size}")
    # an empty segment passes its initial state through unchanged
    for n, length in enumerate(lengths):
        if length == 0:
            assert torch.equal(out["final_state"][n], inputs["initial_state"][n].detach())


@pytest.mark.parametrize("gate", ["normal", "near_zero", "very_negative", "mixed"])
def test_scalar_decays_match_the_float64_segment_sums(gate: str) -> None:
    """The scalar-gate decay matrix (a difference of float64 cumulative sums) is as exact as fp32 allows: each
    decay is exp of its float64 segment sum up to the rounding of that sum to fp32 (a relative error of
    |sum| * 2^-24, plus the rounding of exp), however large the cumulative sums before it; zero above the diagonal."""
    g = make_inputs("simple_gla", batch=3, seq_len=64, num_states=1, gate=gate, seed=3)["g"].detach()
    g = g.permute(0, 2, 1)  # (B, H, C): gates along the last dim
    sums = segsum(g.double())  # (B, H, C, C), -inf above the diagonal
    decays = scalar_decays(g)
    assert decays.dtype == torch.float32
    assert torch.equal(decays.triu(1), torch.zeros_like(decays))
    kept = sums.exp() > 1e-30  # fp32 normal range
    relative = (decays.double() - sums.exp()).abs() / sums.exp()
    bound = (sums.abs() + 2.0) * torch.finfo(torch.float32).eps
    assert (relative <= bound)[kept].all(), gate


def test_varlen_equals_separate_calls() -> None:
    """Packing segments changes nothing: each segment alone gives the same output and final state."""
    lengths = [33, 0, 70, 1]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    inputs = {n: t.detach() for n, t in make_inputs("gated_delta", 1, sum(lengths), len(lengths)).items()}
    o, final = chunk_scan(**inputs, cu_seqlens=offsets, chunk_size=16)
    for n, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        o_n, final_n = chunk_scan(inputs["q"][:, start:end], inputs["k"][:, start:end], inputs["v"][:, start:end],
                                  g=inputs["g"][:, start:end], beta=inputs["beta"][:, start:end],
                                  initial_state=inputs["initial_state"][n:n + 1], chunk_size=16)
        assert_close(o[:, start:end], o_n, 1e-6, floor=RMS_FLOOR, name=f"segment {n} o")
        assert_close(final[n], final_n[0], 1e-6, floor=RMS_FLOOR, name=f"segment {n} final_state")


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("gate", ["near_zero", "very_negative", "mixed"])
@pytest.mark.parametrize("rule", ["gated_delta", "simple_gla", "gla", "delta_per_key"])
def test_chunk_extreme_gates(rule: str, gate: str, chunk_size: int) -> None:
    inputs = make_inputs(rule, batch=1, seq_len=130, num_states=1, gate=gate, seed=11)
    ref = run_with_grads(recurrent_scan, as_float64(inputs))
    out = run_with_grads(chunk_scan, inputs, chunk_size=chunk_size)
    check_all(ref, out, TOL_CHUNK, f"{rule} gate={gate} C={chunk_size}")


def test_low_precision_inputs_keep_fp32_state() -> None:
    inputs = {n: t.detach() for n, t in make_inputs("gated_delta", 1, 40, 1).items()}
    ref_o, ref_final = chunk_scan(**inputs, chunk_size=16)
    low = {n: (t if n == "initial_state" else t.bfloat16()) for n, t in inputs.items()}
    o, final = chunk_scan(**low, chunk_size=16)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close(o.float(), ref_o, 2e-2, floor=RMS_FLOOR, name="bf16 o")
    assert_close(final, ref_final, 2e-2, floor=RMS_FLOOR, name="bf16 final_state")


def test_no_final_state_and_default_initial_state() -> None:
    inputs = {n: t.detach() for n, t in make_inputs("delta", 2, 20, 2).items()}
    del inputs["initial_state"]
    o, final = chunk_scan(**inputs, output_final_state=False, chunk_size=16)
    assert final is None
    zeros = torch.zeros(2, H, K, V)
    o_ref, _ = recurrent_scan(**inputs, initial_state=zeros)
    assert_close(o, o_ref, TOL_CHUNK, floor=RMS_FLOOR, name="o")


# --- gradcheck in float64 on tiny shapes (chunk form) -----------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_chunk_gradcheck(rule: str) -> None:
    # chunk 32 > the short segment, < the long one; 32 also takes the per-key path's two-sub-block branch
    lengths = [3, 0, 37]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    inputs = make_inputs(rule, 1, sum(lengths), len(lengths), dtype=torch.float64, key_dim=3, value_dim=2, heads=1,
                         seed=5)
    names = list(inputs)

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        given = dict(zip(names, tensors))
        return chunk_scan(given["q"], given["k"], given["v"], **{n: given.get(n) for n in INPUTS[3:]},
                          cu_seqlens=offsets, chunk_size=32)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, rtol=1e-4)


# --- input validation ---------------------------------------------------------------------------------------------


def _base() -> dict[str, torch.Tensor]:
    return {n: t.detach() for n, t in make_inputs("gated_delta", 1, 10, 1).items()}


BAD_CALLS = [
    pytest.param(lambda b: dict(b, q=b["q"][0]), "q must be", id="q-rank"),
    pytest.param(lambda b: dict(b, k=b["k"][..., :-1]), "k must have the shape", id="k-shape"),
    pytest.param(lambda b: dict(b, v=b["v"][:, :-1]), "v must be", id="v-shape"),
    pytest.param(lambda b: dict(b, q=b["q"].long()), "q must be a floating", id="q-dtype"),
    pytest.param(lambda b: dict(b, gk=torch.zeros(1, 10, H, K)), "at most one of g", id="g-and-gk"),
    pytest.param(lambda b: dict(b, g=b["g"][..., :1]), "g must have shape", id="g-shape"),
    pytest.param(lambda b: dict(b, beta=b["beta"][:, :5]), "beta must have shape", id="beta-shape"),
    pytest.param(lambda b: dict(b, initial_state=torch.zeros(2, H, K, V)), "initial_state must have shape",
                 id="state-shape"),
    pytest.param(lambda b: dict(b, cu_seqlens=torch.tensor([0.0, 10.0])), "int32 or int64", id="cu-dtype"),
    pytest.param(lambda b: dict(b, cu_seqlens=torch.tensor([[0, 10]])), "1-D", id="cu-rank"),
    pytest.param(lambda b: dict(b, cu_seqlens=torch.tensor([0, 4])), "end at T=10", id="cu-end"),
    pytest.param(lambda b: dict(b, cu_seqlens=torch.tensor([1, 10])), "start at 0", id="cu-start"),
    pytest.param(lambda b: dict(b, cu_seqlens=torch.tensor([0, 6, 4, 10]),
                                initial_state=torch.zeros(3, H, K, V)), "non-decreasing", id="cu-order"),
    pytest.param(lambda b: dict({n: torch.cat([t, t]) for n, t in b.items()}, cu_seqlens=torch.tensor([0, 10])),
                 "batch size must be 1", id="cu-batch"),
    pytest.param(lambda b: dict(b, chunk_size=0), "chunk_size", id="chunk-size"),
    pytest.param(lambda b: dict(b, backend="cuda"), "backend must be", id="backend"),
]


@pytest.mark.parametrize("bad, message", BAD_CALLS)
def test_invalid_inputs_raise(bad, message: str) -> None:
    kwargs = bad(_base())
    with pytest.raises(ValueError, match=message):
        scan(**kwargs) if "backend" in kwargs else chunk_scan(**kwargs)
    if "backend" not in kwargs and "chunk_size" not in kwargs:
        with pytest.raises(ValueError, match=message):
            recurrent_scan(**kwargs)


# --- compiled path ------------------------------------------------------------------------------------------------


def test_compiled_matches_eager_without_recompiling() -> None:
    """Three batch compositions (segment counts and lengths) run through one compiled graph per stage."""
    from torch._dynamo.utils import counters

    compositions = [[5, 0, 70, 1, 64], [130, 2, 0], [1, 0, 0, 33, 17, 90, 16]]
    graphs_after_first = None
    for i, lengths in enumerate(compositions):
        offsets = torch.tensor([0] + lengths).cumsum(0)
        inputs = make_inputs("gated_delta", 1, sum(lengths), len(lengths), seed=20 + i)
        ref = run_with_grads(chunk_scan, inputs, cu_seqlens=offsets, chunk_size=16)
        out = run_with_grads(scan, inputs, cu_seqlens=offsets, chunk_size=16, backend="compiled")
        check_all(ref, out, TOL_COMPILED, f"compiled {lengths}")
        if i == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "a new batch composition recompiled"


def test_compiled_per_key_gate_matches_eager() -> None:
    inputs = make_inputs("gla", 2, 70, 2, seed=31)
    ref = run_with_grads(chunk_scan, inputs, chunk_size=64)
    out = run_with_grads(scan, inputs, chunk_size=64, backend="auto")  # auto is the compiled path on CPU
    check_all(ref, out, TOL_COMPILED, "compiled gla")


def test_compile_failure_raises_naming_the_eager_backend_every_time() -> None:
    """A compiler that fails is reported, naming the backend that runs without it, on every call: no call
    switches to another backend behind the caller's back."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    inputs = {n: t.detach() for n, t in make_inputs("delta", 1, 20, 1).items()}
    for _ in range(2):
        with pytest.raises(dispatch.ScanCompileError,
                           match=r"no compiler here.*MoMConfig.backend='eager'.*scan\(backend='eager'\)"):
            scan(**inputs, chunk_size=16, backend="compiled", compiler=broken_compile)
    ref_o, ref_final = chunk_scan(**inputs, chunk_size=16)
    o, final = scan(**inputs, chunk_size=16, backend="eager")
    assert torch.equal(o, ref_o) and torch.equal(final, ref_final)


def test_triton_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit triton request goes to the Triton scan (or fails clearly); auto never sends CPU inputs there.
    The Triton scan's module is replaced in the import system: a stand-in that records its calls, then none."""
    calls = []

    def fake_triton_scan(q, k, v, **kwargs):
        calls.append(kwargs)
        return chunk_scan(q, k, v, **kwargs)

    # shapes, chunk size and autograd mode of the compiled test above: auto (compiled on CPU) reuses its graphs
    inputs = make_inputs("gated_delta", 1, 40, 1)
    monkeypatch.setitem(sys.modules, "mom_lit.ops.scan.triton", types.SimpleNamespace(triton_scan=fake_triton_scan))
    scan(**inputs, backend="triton")
    assert len(calls) == 1 and calls[0]["g"] is inputs["g"] and calls[0]["beta"] is inputs["beta"]
    scan(**inputs, backend="auto", chunk_size=16)
    assert len(calls) == 1, "auto picked the Triton scan for CPU tensors"

    monkeypatch.setitem(sys.modules, "mom_lit.ops.scan.triton", None)  # an import that fails
    with pytest.raises(RuntimeError, match="backend='triton'"):
        scan(**inputs, backend="triton")


def test_backend_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    dispatch.log_backend_choice.cache_clear()  # earlier tests of this process logged theirs
    inputs = {n: t.detach() for n, t in make_inputs("linear", 1, 9, 1).items()}
    with caplog.at_level("INFO", logger="mom_lit"):
        scan(**inputs, backend="eager")
        scan(**inputs, backend="eager")
    assert [r.getMessage() for r in caplog.records] == ["memory scan backend: eager (requested)"]

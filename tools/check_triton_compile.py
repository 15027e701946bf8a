"""Compile every Triton kernel of mom_lit for a CUDA architecture with the INSTALLED Triton, without a GPU.

The interpreter (``TRITON_INTERPRET=1``, what the CPU tests run) never lowers a kernel to PTX, so it cannot see
compiler failures of a given Triton release (a verifier error in a layout pass, a shared-memory overflow,
ptxas rejecting the code). This tool installs a stand-in driver that reports a CUDA target (sm90 by default)
and turns every launch into a compile-only call (``warmup``), then drives the library's real entry points with
small CPU tensors: ``triton_scan`` forward and backward for every rule family, fp32 and bf16, head dims
64/128/256, with and without an initial state, dense and varlen; ``triton_decode_step``; the slot and mix stages
of ``ops/slots/`` and ``ops/mix/`` (forward and backward). Each kernel is therefore compiled exactly as the library
launches it (argument dtypes, divisibility and constexpr specialisation, ``num_warps`` / ``num_stages``).
Kernel outputs are never written (launches are skipped), which is harmless: no host code reads them here.

Prints one line per kernel (ok / FAILED with the first error line and the specialisation that failed), lists
any ``@triton.jit`` function of the package that was neither launched nor called by a launched kernel, and
exits non-zero on any failure or uncovered kernel. A full run takes ~10-15 min on two CPU cores with an empty
Triton cache (compiled kernels are cached in ~/.triton/cache; failures are not, so a rerun retries only them).

Usage:
    PYTHONPATH=/path/to/triton-X python tools/check_triton_compile.py [--arch 90 --arch 80] [--quick]

A given Triton release can be checked without installing it over the environment's one; on a machine with
package access:
    pip download --no-deps triton==3.6.0 -d /tmp/wheels     # the manylinux wheel bundles ptxas
    pip install --no-deps --target /tmp/t36 /tmp/wheels/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/t36 python tools/check_triton_compile.py
(the wheel must match this machine's Python version; only ``triton`` is replaced, torch stays as installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import itertools
import os
import sys
import tempfile
import traceback
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

MODULES = ("mom_lit.ops.scan.triton.common", "mom_lit.ops.scan.triton.forward", "mom_lit.ops.scan.triton.backward",
           "mom_lit.ops.decode.kernels", "mom_lit.ops.scan.triton.scan", "mom_lit.ops.scan.triton.chunk_index",
           "mom_lit.ops.stage_launch", "mom_lit.ops.slots.kernels", "mom_lit.ops.slots.gates", "mom_lit.ops.mix.kernels")


class CompileOnlyDriver(DriverBase):
    """Reports a fixed CUDA target; kernels are compiled for it and never launched."""

    def __init__(self, arch: int):
        self.arch = arch

    @staticmethod
    def is_active():
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("no launcher is built: launches are compile-only")

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise NotImplementedError("no benchmarker: launches are compile-only, nothing runs")


class Recorder:
    """Wraps ``JITFunction.run``: every launch compiles (warmup), failures are recorded and execution goes on."""

    def __init__(self):
        self.results: dict[str, dict[str, str | None]] = defaultdict(dict)  # kernel -> case -> error or None
        self.case = ""
        self._run = JITFunction.run

    def install(self):
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            name = f"{fn.fn.__module__.removeprefix('mom_lit.')}.{fn.fn.__name__}"
            consts = {p.name: a for p, a in zip(fn.params, args) if p.is_constexpr}
            consts.update({k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")})
            for p in fn.params:
                if p.is_constexpr and p.name in kwargs:
                    consts[p.name] = kwargs[p.name]
            dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
            spec = f"{recorder.case} | {' '.join(f'{k}={v}' for k, v in consts.items())} | {','.join(dtypes)}"
            # MLIR prints its diagnostics to the process's stderr (fd 2): captured to report the first one.
            with tempfile.TemporaryFile(mode="w+") as log:
                saved = os.dup(2)
                os.dup2(log.fileno(), 2)
                try:
                    recorder._run(fn, *args, grid=grid, warmup=True, **kwargs)
                    error = None
                except Exception as caught:  # noqa: BLE001 - every compiler error is reported, not raised
                    error = caught
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                log.seek(0)
                diagnostics = log.read()
            if error is None:
                recorder.results[name].setdefault(spec, None)
            else:
                recorder.results[name][spec] = _first_error_line(error, diagnostics)
                print(f"FAILED {name}: {spec}\n    {recorder.results[name][spec]}", flush=True)
            return None

        JITFunction.run = run


def _first_error_line(error: BaseException, diagnostics: str = "") -> str:
    text = "".join(traceback.format_exception_only(type(error), error))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in diagnostics.splitlines() + lines:  # MLIR diagnostics carry the useful line ("error: ...")
        if "error:" in ln:
            return ln.strip()[:240]
    return (lines[-1] if lines else repr(error))[:200]


# ----------------------------------------------------------------------------------------------------------------
# Entry points, called with CPU tensors (the launches only compile).

RULES = {"linear": (False, False), "simple_gla": (True, False), "delta": (False, True), "gated_delta": (True, True)}


def run_scan(rec: Recorder, quick: bool):
    from mom_lit.ops.scan.triton.scan import triton_scan

    dims = [(64, 64), (128, 128), (256, 256)] + ([] if quick else [(128, 96)])
    dtypes = [torch.float32, torch.bfloat16] + ([] if quick else [torch.float16])
    recomputes = ["states"] if quick else ["states", "none", "wy"]
    for rule, (K, V), dtype, h0, varlen, recompute in itertools.product(
            RULES, dims, dtypes, (False, True), (False, True), recomputes):
        use_g, is_delta = RULES[rule]
        rec.case = f"scan {rule} K{K} V{V} {str(dtype)[6:]} h0={int(h0)} varlen={int(varlen)} rc={recompute}"
        B, T, H = (1, 200, 2) if varlen else (2, 128, 2)
        q = torch.randn(B, T, H, K, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, H, K, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, H, V, dtype=dtype, requires_grad=True)
        g = torch.randn(B, T, H, requires_grad=True) if use_g else None
        beta = torch.rand(B, T, H, requires_grad=True) if is_delta else None
        cu = torch.tensor([0, 70, 70, 200]) if varlen else None
        N = 3 if varlen else B
        s0 = torch.randn(N, H, K, V, requires_grad=True) if h0 else None
        o, ht = triton_scan(q, k, v, g=g, beta=beta, initial_state=s0, cu_seqlens=cu, recompute=recompute)
        torch.autograd.backward([o.float().sum(), ht.sum()])  # with a final-state gradient (HAS_DHT)
        if not h0 and not varlen:  # no final-state output and no dht
            o, _ = triton_scan(q, k, v, g=g, beta=beta, output_final_state=False, recompute=recompute)
            o.float().sum().backward()


def run_decode(rec: Recorder, quick: bool):
    from mom_lit.ops.decode.kernels import triton_decode_step

    shapes = [(4, 256, 256), (2, 128, 128), (2, 64, 64)] + ([] if quick else [(1, 128, 96)])
    for rule, (H, K, V), dtype, conv in itertools.product(
            RULES, shapes, (torch.float32, torch.bfloat16), (4, 1, 0)):
        use_g, is_delta = RULES[rule]
        rec.case = f"decode {rule} H{H} K{K} V{V} {str(dtype)[6:]} conv={conv}"
        batch, streams, slots = 3, 5, 3
        qd, vd = H * K, H * V
        channels = 2 * qd + vd
        kwargs = dict(
            q=torch.randn(batch, qd, dtype=dtype), k=torch.randn(batch, streams, qd, dtype=dtype),
            v=torch.randn(batch, streams, vd, dtype=dtype), memory=torch.randint(0, streams, (batch, slots)),
            state=torch.randn(streams, batch, H, K, V).transpose(0, 1), conv_state=None, conv_weight=None,
            scale=K ** -0.5)
        if conv:
            kwargs["conv_state"] = torch.randn(streams, batch, conv - 1, channels, dtype=dtype).transpose(0, 1)
            kwargs["conv_weight"] = torch.randn(channels, conv, dtype=dtype)
        if use_g:
            kwargs.update(a=torch.randn(batch, streams, H, dtype=dtype), a_log=torch.randn(H), dt_bias=torch.randn(H))
        if is_delta:
            kwargs["b"] = torch.randn(batch, streams, H, dtype=dtype)
        triton_decode_step(**kwargs)


def run_layer_stages(rec: Recorder, quick: bool):
    from mom_lit.layout import build_layout
    from mom_lit.ops.mix import mix_gated_rms_norm
    from mom_lit.ops.slots.gates import scalar_gates
    from mom_lit.ops.stage_launch import DEFAULT_LAUNCH
    from mom_lit.ops.slots import slot_conv

    shapes = [(4, 256, 256), (2, 128, 128), (2, 64, 64)] + ([] if quick else [(2, 128, 96)])
    for (H, K, V), dtype, width, gated, tokens, dx_kernel in itertools.product(
            shapes, (torch.float32, torch.bfloat16), (4, 2), (True, False), (37, 128), ("taps", "tiles")):
        rec.case = (f"layer H{H} K{K} V{V} {str(dtype)[6:]} W={width} gate={int(gated)} N={tokens} "
                    f"dx_kernel={dx_kernel}")
        launch = dataclasses.replace(DEFAULT_LAUNCH, dx_kernel=dx_kernel)
        S, J = 5, 3

        def rand(*shape):
            return torch.randn(*shape).to(dtype).requires_grad_()

        memory = torch.stack([torch.randperm(S)[:J] for _ in range(tokens)])  # (N_tok, J) distinct streams
        layout = build_layout(memory, torch.zeros(tokens, dtype=torch.int64), 1, S)
        q_src, kv_src = rand(tokens, H * K), rand(tokens * S, H * (K + V + 2))
        weight = rand(H * (2 * K + V), width)
        outs = list(slot_conv(q_src, kv_src, weight, layout.token, layout.token * S + layout.memory,
                              layout.position, layout.rank, H, K, V, 2 * H, launch=launch))
        o = rand(layout.token.numel(), H, V)
        gate = rand(tokens, H, V) if gated else None
        routing = torch.rand(tokens, J).to(dtype).requires_grad_()
        outs.append(mix_gated_rms_norm(o, layout.rank, routing, gate, torch.ones(V, dtype=dtype), 1e-5,
                                       launch=launch))
        outs += scalar_gates(outs[3], rand(H), rand(H), H, True)  # the gate columns of each slot
        torch.autograd.backward([t.float().sum() for t in outs])


# ----------------------------------------------------------------------------------------------------------------


def jit_functions() -> dict[str, JITFunction]:
    found = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module_name:
                found[f"{module_name.removeprefix('mom_lit.')}.{attr}"] = value
    return found


def check(arch: int, quick: bool, stages: list[str] | None = None) -> int:
    driver.set_active(CompileOnlyDriver(arch))
    for fn in jit_functions().values():  # binders and compiled kernels are cached per device, not per target
        fn.device_caches.clear()
    rec = Recorder()
    rec.install()
    for stage in (run_layer_stages, run_decode, run_scan):
        if stages and stage.__name__.removeprefix("run_") not in stages:
            continue
        try:
            stage(rec, quick)
        except Exception as error:  # noqa: BLE001 - a host-side failure of a stage is a failure too
            rec.results[f"<{stage.__name__}>"][rec.case] = _first_error_line(error)

    failures = 0
    print(f"\nTriton {triton.__version__}, target cuda sm{arch}")
    print(f"{'kernel':<42} {'result':<8} launches (case x specialisation) compiled / failed")
    for name in sorted(rec.results):
        cases = rec.results[name]
        bad = {case: err for case, err in cases.items() if err is not None}
        failures += bool(bad)
        print(f"{name:<42} {'FAILED' if bad else 'ok':<8} {len(cases) - len(bad):>6} ok / {len(bad):<5} failed")
        for case, err in list(bad.items())[:3]:
            print(f"    {case}\n        {err}")
        if len(bad) > 3:
            print(f"    ... {len(bad) - 3} more failing specialisations")
    launched = {name for name in rec.results}
    sources = {name: inspect.getsource(fn.fn) for name, fn in jit_functions().items()}
    for name, fn in jit_functions().items():
        if name in launched or stages:  # coverage is only judged on a full run
            continue
        short = fn.fn.__name__
        callers = [other for other, src in sources.items() if other != name and f"{short}(" in src]
        if not callers:
            failures += 1
            print(f"{name:<42} {'UNCOVERED':<8} (never launched nor called by a launched kernel)")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="CUDA compute capability, e.g. 90 (default) or 80")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and options (fp32/bf16, K 64/128/256)")
    parser.add_argument("--stage", action="append", choices=("layer_stages", "decode", "scan"),
                        help="only these entry points (default: all)")
    args = parser.parse_args()
    failures = sum(check(arch, args.quick, args.stage) for arch in (args.arch or [90]))
    print("\nall kernels compiled" if not failures else f"\n{failures} kernel(s) FAILED or uncovered")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

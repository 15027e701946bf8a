"""Time the Triton memory scan over the MoM layout against causal SDPA attention at the same shapes (CUDA).

The MoM layout of one layer: every token is written to its top-k routed memories and to the shared memory, and
all (row, memory) token runs are packed as varlen segments of one scan: 3 streams per token for top-2 + shared.
Routing is uniform at random (each token picks k distinct memories of E), so routed segment lengths vary.

    python tools/bench_kernels.py                      # the ANCHORS.md setting: bf16, 4 heads x 256, E=4 top-2
    python tools/bench_kernels.py --sweep --profile    # also try launch configs and print a kernel breakdown

Times are medians of ``triton.testing.do_bench`` (ms). fwd+bwd backpropagates a random output gradient into
q, k, v, g and beta. The table is printed last (markdown) and optionally written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without an install too

from mom_lit.ops.scan.triton.scan import DEFAULT_LAUNCH, Launch, LaunchConfig, triton_scan  # noqa: E402

from benchlib import bench as _bench  # noqa: E402
from benchlib import fla_hopper_guard_lifted, parse_shape, peak_memory_gib, table_header, table_row  # noqa: E402


def mom_lengths(batch: int, seq_len: int, memories: int, topk: int, shared: bool, gen: torch.Generator) -> list[int]:
    """Segment lengths of the packed (row, memory) layout: per row, E routed memories then the shared one."""
    lengths = []
    for _ in range(batch):
        choice = torch.rand(seq_len, memories, generator=gen).topk(topk, dim=-1).indices  # (T, k) distinct
        lengths += torch.bincount(choice.flatten(), minlength=memories).tolist()
        if shared:
            lengths.append(seq_len)
    return lengths


def scan_inputs(lengths: list[int], heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device="cuda")  # noqa: E731
    q = rand(1, total, heads, key_dim).to(dtype)
    k = F.normalize(rand(1, total, heads, key_dim), dim=-1).to(dtype)
    v = rand(1, total, heads, value_dim).to(dtype)
    g = F.logsigmoid(rand(1, total, heads) + 3.0)  # fp32 log-decays, mostly close to 0 as in trained models
    beta = torch.sigmoid(rand(1, total, heads)).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, g, beta, cu


def scan_flops(tokens: int, heads: int, key_dim: int, value_dim: int, chunk: int = 64) -> float:
    """Matrix-product FLOPs of the chunked gated-delta forward (prep, state pass, output), padding ignored."""
    per_token = 2 * (chunk * key_dim  # K K^T
                     + chunk * (key_dim + value_dim)  # W, Uv
                     + 2 * key_dim * value_dim  # W S0, K^T U
                     + chunk * key_dim + key_dim * value_dim + chunk * value_dim)  # Q K^T, Q S0, P U
    return float(per_token * tokens * heads)


def bench(fn) -> float:
    """Median milliseconds of ``fn()`` on CUDA (``do_bench`` over 200 ms)."""
    return _bench(fn, "cuda", rep_ms=200, warmup_ms=25)


def time_scan(inputs, backward: bool, launch: LaunchConfig) -> float:
    q, k, v, g, beta, cu = inputs
    if not backward:
        with torch.no_grad():
            return bench(lambda: triton_scan(q, k, v, g=g, beta=beta, cu_seqlens=cu, output_final_state=False,
                                             launch=launch))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step():
        o, _ = triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu, output_final_state=False,
                           launch=launch)
        # autograd.grad rather than .backward: no copies of the gradients into .grad of the leaves
        torch.autograd.grad(o, leaves, do)

    return bench(step)


def time_sdpa(batch: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, backward: bool) -> float:
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    if not backward:
        with torch.no_grad():
            return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)
    return bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves, is_causal=True), leaves, do))


def load_fla():
    """fla's chunk_gated_delta_rule when fla is importable, else None. Its timings run with fla's Hopper guard lifted
    (``benchlib.fla_hopper_guard_lifted``: timing only, fla's gradients are not used)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def time_fla(fla_scan, inputs, backward: bool) -> float:
    q, k, v, g, beta, cu = inputs
    cu = cu.long()
    if not backward:
        with torch.no_grad():
            return bench(lambda: fla_scan(q, k, v, g, beta, cu_seqlens=cu, output_final_state=False))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)
    return bench(lambda: torch.autograd.grad(fla_scan(*leaves, cu_seqlens=cu, output_final_state=False)[0],
                                             leaves, do))


def fla_output_difference(fla_scan, inputs, launch: LaunchConfig) -> float:
    """Relative RMS difference of the forward outputs of fla and of this scan (a cross-check of both)."""
    q, k, v, g, beta, cu = inputs
    with torch.no_grad():
        ours = triton_scan(q, k, v, g=g, beta=beta, cu_seqlens=cu, output_final_state=False,
                           launch=launch)[0].float()
        theirs = fla_scan(q, k, v, g, beta, cu_seqlens=cu.long(), output_final_state=False)[0].float()
    return ((ours - theirs).norm() / theirs.norm()).item()


def fwd_bwd_step(inputs):
    """A fwd+bwd of the scan on ``inputs`` under the launch settings it is called with."""
    q, k, v, g, beta, cu = inputs
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step(launch: LaunchConfig):
        o, _ = triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu, output_final_state=False,
                           launch=launch)
        return o, torch.autograd.grad(o, leaves, do)

    return step


def kernel_times(inputs, launch: LaunchConfig, reps: int = 5) -> dict[str, tuple[float, int]]:
    """Device ms and launches per fwd+bwd of every kernel (profiler) under ``launch``, by kernel name."""
    step = functools.partial(fwd_bwd_step(inputs), launch)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            times[event.key] = (total / reps / 1000, event.count // reps)
    return times


def kernel_breakdown(inputs, launch: LaunchConfig) -> str:
    rows = sorted(((ms, n, name) for name, (ms, n) in kernel_times(inputs, launch).items()), reverse=True)
    lines = table_header(["kernel", "ms per fwd+bwd", "launches"])
    lines += [table_row([name[:60], f"{ms:.3f}", n]) for ms, n, name in rows[:12]]
    return "\n".join(lines)


def _kernel_times_if_fits(inputs, launch: LaunchConfig, label: str) -> dict[str, tuple[float, int]] | None:
    """:func:`kernel_times` under ``launch``, or None (reported) where it does not fit the card."""
    try:
        return kernel_times(inputs, launch, reps=3)
    except Exception as error:  # noqa: BLE001 - a setting may not fit (registers, shared memory)
        print(f"{label} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return None


CHUNK_KERNELS = ("wy_solve", "wy_apply", "output", "du_local", "dqk", "wy_bwd")
STATE_KERNELS = ("state_fwd", "state_recompute", "state_bwd")


def sweep(inputs, base: LaunchConfig) -> tuple[LaunchConfig, list[str]]:
    """Time every kernel under several launch settings; return the fastest setting per kernel and a report. The tile
    widths of the per-chunk kernels stay those of ``base`` (--sweep-tiles varies them)."""
    chunk_combos = [(4, 1), (4, 2), (8, 1), (8, 2), (8, 3), (4, 3)]
    state_combos = [(8, 1, 32), (8, 2, 32), (8, 1, 16), (8, 2, 16), (4, 1, 16), (4, 2, 16), (8, 1, 64), (4, 1, 32),
                    (8, 2, 64), (8, 3, 32), (4, 2, 32), (4, 2, 64)]
    results = []  # (kernel, (warps, stages, block_v or None), ms)
    for i, (warps, stages, block_v) in enumerate(state_combos):
        chunk = Launch(*chunk_combos[i % len(chunk_combos)])
        cfg = LaunchConfig(state_block_v=block_v, **{name: _with_tiles(chunk, base, name) for name in CHUNK_KERNELS},
                           **{name: Launch(warps, stages) for name in STATE_KERNELS})
        times = _kernel_times_if_fits(inputs, cfg, f"setting {i}")
        if times is None:
            continue
        for name in CHUNK_KERNELS:
            results.append((name, (chunk.num_warps, chunk.num_stages, None), times[f"{name}_kernel"][0]))
        for name in STATE_KERNELS:
            results.append((name, (warps, stages, block_v), times[f"{name}_kernel"][0]))
        print(f"setting {i}: " + ", ".join(f"{n}={times[n + '_kernel'][0]:.3f}" for n in CHUNK_KERNELS + STATE_KERNELS),
              flush=True)
    best = {}  # the fastest setting of each kernel; each sequential pass takes its own V-block (Launch.block_v)
    for name, setting, ms in results:
        if name not in best or ms < best[name][1]:
            best[name] = (setting, ms)
    cfg = LaunchConfig(state_block_v=base.state_block_v,
                       **{name: _with_tiles(Launch(*best[name][0][:2]), base, name) for name in CHUNK_KERNELS},
                       **{name: Launch(*best[name][0][:2], block_v=best[name][0][2]) for name in STATE_KERNELS})
    lines = table_header(["kernel", "best (warps, stages[, BV])", "ms", "all settings tried (warps, stages[, BV]): ms"])
    for name in CHUNK_KERNELS + STATE_KERNELS:
        tried = ", ".join(f"{_setting(s)}: {ms:.3f}" for n, s, ms in results if n == name)
        lines.append(f"| {name} | {_setting(best[name][0])} | {best[name][1]:.3f} | {tried} |")
    return cfg, lines


def _setting(setting: tuple) -> str:
    """(warps, stages, V-block or None) as "warps,stages[,BV]"."""
    return ",".join(str(x) for x in setting if x is not None)


def _with_tiles(launch: Launch, base: LaunchConfig, name: str) -> Launch:
    """``launch`` with the tile widths that ``base`` gives kernel ``name``."""
    kept = getattr(base, name)
    return dataclasses.replace(launch, block_k=kept.block_k, block_v=kept.block_v)


TILE_KERNELS = ("output", "du_local", "dqk", "wy_bwd")
# (block_k, block_v): BK 256 needs more shared memory than an H200 has; BV 32 was slower there at every setting
TILE_WIDTHS = ((64, 64), (128, 64), (64, 128), (64, 256))
TILE_LAUNCHES = ((4, 1), (4, 2), (8, 2), (8, 3), (8, 4), (16, 2), (16, 3))  # (warps, stages)


def _tile_label(launch: Launch) -> str:
    return f"{launch.num_warps},{launch.num_stages},{launch.block_k},{launch.block_v}"


def sweep_tiles(inputs, base: LaunchConfig) -> tuple[LaunchConfig, list[str]]:
    """Time the per-chunk kernels that take tile widths under several widths and launch settings (the others as
    ``base``); return the fastest per kernel (settings that exceed the shared memory are skipped)."""
    results = []  # (kernel, Launch, ms)
    for block_k, block_v in TILE_WIDTHS:
        for warps, stages in TILE_LAUNCHES:
            launch = Launch(warps, stages, block_k, block_v)
            cfg = dataclasses.replace(base, **{name: launch for name in TILE_KERNELS})
            times = _kernel_times_if_fits(inputs, cfg, str(launch))
            if times is None:
                continue
            for name in TILE_KERNELS:
                results.append((name, launch, times[f"{name}_kernel"][0]))
            print(f"{launch}: " + ", ".join(f"{n}={times[n + '_kernel'][0]:.3f}" for n in TILE_KERNELS), flush=True)
    best = {name: min(((launch, ms) for n, launch, ms in results if n == name), key=lambda x: x[1])
            for name in TILE_KERNELS}
    lines = table_header(["kernel", "best (warps, stages, BK, BV)", "ms",
                          "all settings tried (warps, stages, BK, BV): ms"])
    for name in TILE_KERNELS:
        tried = ", ".join(f"{_tile_label(launch)}: {ms:.3f}" for n, launch, ms in results if n == name)
        lines.append(f"| {name} | ({_tile_label(best[name][0])}) | {best[name][1]:.3f} | {tried} |")
    return dataclasses.replace(base, **{name: best[name][0] for name in TILE_KERNELS}), lines


def max_relative_difference(inputs, cfg_a: LaunchConfig, cfg_b: LaunchConfig) -> float:
    """Largest relative RMS difference of o and the gradients between two launch configs (same inputs)."""
    torch.manual_seed(0)
    step = fwd_bwd_step(inputs)
    outs = []
    for cfg in (cfg_a, cfg_b):
        o, grads = step(cfg)
        outs.append([o, *grads])
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*outs))


GRADIENTS = ("o", "dq", "dk", "dv", "dg", "dbeta")


def errors_against_fp32(inputs, launch: LaunchConfig) -> dict[str, float]:
    """Relative RMS error of o and every gradient against the same scan on the inputs upcast to fp32 (exact
    products), under ``launch``."""
    q, k, v, g, beta, cu = inputs
    do = torch.randn(v.shape, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda")

    def run(tensors):
        leaves = [x.detach().requires_grad_() for x in tensors]
        o, _ = triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu, output_final_state=False,
                           launch=launch)
        return [o, *torch.autograd.grad(o, leaves, do.to(o.dtype))]

    low = run((q, k, v, g, beta))
    exact = run([x.float() for x in (q, k, v, g, beta)])
    return {name: ((a.float() - b).norm() / b.norm()).item() for name, a, b in zip(GRADIENTS, low, exact)}


def load_variants(path: str, base: LaunchConfig) -> dict[str, LaunchConfig]:
    """The launch settings to compare: ``base`` ("in use") and, for each JSON object at ``path`` (one object or a
    list of them), ``base`` with that object's LaunchConfig fields replaced (a Launch as {"num_warps": ...,
    "num_stages": ...}). Unknown fields raise a ValueError that names them."""
    spec = json.loads(Path(path).read_text())
    objects = spec if isinstance(spec, list) else [spec]
    known = {field.name for field in dataclasses.fields(LaunchConfig)}
    configs = {"in use": base}
    for i, obj in enumerate(objects, start=1):
        if not isinstance(obj, dict) or set(obj) - known:
            unknown = sorted(set(obj) - known) if isinstance(obj, dict) else obj
            raise ValueError(f"{path}: variant {i} must be an object of LaunchConfig fields; not fields: {unknown}")
        fields = {name: Launch(**value) if isinstance(value, dict) else value for name, value in obj.items()}
        configs[f"variant {i}"] = dataclasses.replace(base, **fields)
    return configs


def _changed_fields(cfg: LaunchConfig, base: LaunchConfig) -> str:
    """The fields of ``cfg`` that differ from ``base``, as name=value (a variant's line of the report)."""
    return ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                     if getattr(cfg, f.name) != getattr(base, f.name))


def compare_variants(inputs, path: str, base: LaunchConfig, errors: bool = True) -> list[str]:
    """Kernel times (and, with ``errors``, errors against fp32 inputs, which compiles the fp32 kernels too) of the
    launch settings ``base`` ("in use") and of each variant of :func:`load_variants`, on the same inputs."""
    configs = load_variants(path, base)
    times, errs, failed = {}, {}, {}
    for label, cfg in configs.items():
        try:
            times[label] = kernel_times(inputs, cfg)
            if errors:
                errs[label] = errors_against_fp32(inputs, cfg)
        except Exception as error:  # a variant that does not build (shared memory, registers) is reported
            if label == "in use":
                raise
            times.pop(label, None)
            failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"{label} failed: {failed[label]}", flush=True)
            continue
        print(f"{label} timed", flush=True)
    names = sorted(set().union(*times.values()), key=lambda n: -times["in use"].get(n, (0, 0))[0])
    ms = {label: {name: t.get(name, (0.0, 0))[0] for name in names} for label, t in times.items()}
    labels = list(times)
    lines = [f"{label}: {_changed_fields(cfg, base)}" + (f" -- did not run: {failed[label]}" if label in failed else "")
             for label, cfg in configs.items() if label != "in use"]
    lines += table_header(["kernel (ms per fwd+bwd)", *labels])
    lines += [table_row([name[:60], *(f"{ms[label][name]:.3f}" for label in labels)]) for name in names[:12]]
    lines.append(table_row(["all kernels", *(f"{sum(ms[label].values()):.3f}" for label in labels)]))
    if errors:
        lines += ["", *table_header(["relative RMS error against fp32 inputs", *GRADIENTS])]
        lines += [table_row([label, *(f"{errs[label][n]:.2e}" for n in GRADIENTS)]) for label in labels]
    return lines


def first_shape_inputs(args, dtype: torch.dtype):
    """Scan inputs of the MoM layout at the first of ``--shapes`` (routing and values of seed 0): what the sweeps,
    the profile and the variants time."""
    B, T = args.shapes[0]
    lengths = mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(0))
    return scan_inputs(lengths, args.heads, args.head_dim, args.head_dim, dtype, seed=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=lambda text: [parse_shape(s) for s in text.split(",")],
                        default=[(8, 2048), (2, 8192)], help="comma-separated BxT of the layer input")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--memories", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sweep", action="store_true", help="time several launch configs on the first shape")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="time tile widths and launch settings of output, du_local, dqk and wy_bwd on the first "
                             "shape")
    parser.add_argument("--launch-json", default=None,
                        help="write the scan's launch settings in use after the sweeps here (for bench_layer.py "
                             "--scan-launch-json)")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of the first shape")
    parser.add_argument("--variant-json", default=None,
                        help="on the first shape, kernel times and errors against fp32 inputs of the launch settings "
                             "in use and of those with this JSON object's LaunchConfig fields replaced (or a list "
                             "of such objects: each one a variant)")
    parser.add_argument("--variant-times-only", action="store_true",
                        help="--variant-json without the errors against fp32 inputs (which compile the fp32 "
                             "kernels too)")
    parser.add_argument("--fla", action="store_true", help="also time fla's chunk_gated_delta_rule, if importable")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.variant_json:  # a bad file fails here, not after the sweeps
        try:
            load_variants(args.variant_json, DEFAULT_LAUNCH)
        except (OSError, ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            parser.error(f"--variant-json: {error}")
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    shapes = args.shapes
    H, D = args.heads, args.head_dim
    in_use = DEFAULT_LAUNCH  # the launch settings of every timing below; the sweeps replace them by their best
    report = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{args.dtype}, scan heads {H} x {D}, E={args.memories} top-{args.topk} + shared"]

    if args.sweep:
        B, T = shapes[0]
        inputs = first_shape_inputs(args, dtype)
        best, lines = sweep(inputs, in_use)
        diff = max_relative_difference(inputs, LaunchConfig(), best)
        in_use = best
        report += [f"\nPer-kernel launch sweep at {B} x {T} (ms per fwd+bwd):", *lines, f"\nfastest: {best!r}",
                   f"largest relative difference of o and gradients against the default config: {diff:.1e}"]
        print("\n".join(report[-4:]), flush=True)

    if args.sweep_tiles:
        B, T = shapes[0]
        inputs = first_shape_inputs(args, dtype)
        best, lines = sweep_tiles(inputs, in_use)
        diff = max_relative_difference(inputs, in_use, best)
        in_use = best
        report += [f"\nTile sweep of the per-chunk kernels at {B} x {T} (ms per fwd+bwd):", *lines,
                   f"\nfastest: {', '.join(f'{n}={getattr(best, n)}' for n in TILE_KERNELS)}",
                   f"largest relative difference of o and gradients against the settings before: {diff:.1e}"]
        print("\n".join(report[-4:]), flush=True)

    if args.launch_json:
        Path(args.launch_json).write_text(json.dumps(dataclasses.asdict(in_use), indent=1))

    if args.profile:
        B, T = shapes[0]
        inputs = first_shape_inputs(args, dtype)
        report += [f"\nKernel breakdown, MoM scan fwd+bwd at {B} x {T}:", kernel_breakdown(inputs, in_use)]
        print(report[-1], flush=True)

    if args.variant_json:
        B, T = shapes[0]
        inputs = first_shape_inputs(args, dtype)
        lines = [f"\nLaunch settings in use against variants, MoM scan at {B} x {T}:",
                 *compare_variants(inputs, args.variant_json, in_use, errors=not args.variant_times_only)]
        report += lines
        print("\n".join(lines), flush=True)

    table = table_header(["shape (B x T)", "scan tokens (segments)", "MoM scan fwd", "MoM scan fwd+bwd", "fwd TFLOP/s",
                          "1-stream scan fwd / fwd+bwd", "SDPA 4x256 fwd / fwd+bwd", "SDPA 16x64 fwd / fwd+bwd",
                          "scan peak GiB (fwd+bwd)"])
    for B, T in shapes:
        lengths = mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(B * T))
        inputs = scan_inputs(lengths, H, D, D, dtype, seed=1)
        fwd, fwd_bwd = time_scan(inputs, False, in_use), time_scan(inputs, True, in_use)
        tflops = scan_flops(sum(lengths), H, D, D) / fwd / 1e9
        single = scan_inputs([T] * B, H, D, D, dtype, seed=2)
        single_fwd, single_fb = time_scan(single, False, in_use), time_scan(single, True, in_use)
        sdpa_a = time_sdpa(B, T, H, D, dtype, False), time_sdpa(B, T, H, D, dtype, True)
        sdpa_b = time_sdpa(B, T, 16, 64, dtype, False), time_sdpa(B, T, 16, 64, dtype, True)
        q, k, v, g, beta, cu = inputs
        leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
        peak = peak_memory_gib(lambda: triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu,
                                                   output_final_state=False, launch=in_use)[0].sum().backward(),
                               "cuda", above_start=True)
        table.append(f"| {B} x {T} | {sum(lengths)} ({len(lengths)}) | {fwd:.3f} ms | {fwd_bwd:.3f} ms | "
                     f"{tflops:.0f} | {single_fwd:.3f} / {single_fb:.3f} ms | {sdpa_a[0]:.3f} / {sdpa_a[1]:.3f} ms | "
                     f"{sdpa_b[0]:.3f} / {sdpa_b[1]:.3f} ms | {peak:.2f} |")
        print(table[-1], flush=True)
    report += ["", *table]

    fla_scan = load_fla() if args.fla else None
    if args.fla and fla_scan is None:
        report.append("\nfla is not importable here: no fla figures")
    if fla_scan is not None:
        import fla

        lines = [f"\nfla {fla.__version__} chunk_gated_delta_rule on the same inputs (its Hopper guard lifted, "
                 "timing only):", *table_header(["shape (B x T)", "layout", "ours fwd / fwd+bwd", "fla fwd / fwd+bwd",
                                                 "o difference ours vs fla"])]
        with fla_hopper_guard_lifted():
            for B, T in shapes:
                lengths = mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(B * T))
                for layout, inputs in (("MoM, 3 streams", scan_inputs(lengths, H, D, D, dtype, seed=1)),
                                       ("1 stream", scan_inputs([T] * B, H, D, D, dtype, seed=2))):
                    ours = time_scan(inputs, False, in_use), time_scan(inputs, True, in_use)
                    theirs = time_fla(fla_scan, inputs, False), time_fla(fla_scan, inputs, True)
                    lines.append(f"| {B} x {T} | {layout} | {ours[0]:.3f} / {ours[1]:.3f} ms | {theirs[0]:.3f} / "
                                 f"{theirs[1]:.3f} ms | {fla_output_difference(fla_scan, inputs, in_use):.1e} |")
                    print(lines[-1], flush=True)
        report += lines
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

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
import sys

import torch
import torch.nn.functional as F
import triton
import triton.testing

from mom_lit.ops.triton import scan as scan_module
from mom_lit.ops.triton.scan import LaunchConfig, triton_scan


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
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_scan(inputs, backward: bool) -> float:
    q, k, v, g, beta, cu = inputs
    if not backward:
        with torch.no_grad():
            return bench(lambda: triton_scan(q, k, v, g=g, beta=beta, cu_seqlens=cu, output_final_state=False))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step():
        o, _ = triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu, output_final_state=False)
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


def peak_memory_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def kernel_breakdown(inputs) -> str:
    """Device time per kernel of one fwd+bwd (profiler), largest first."""
    q, k, v, g, beta, cu = inputs
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step():
        o, _ = triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu, output_final_state=False)
        torch.autograd.grad(o, leaves, do)

    step()
    torch.cuda.synchronize()
    reps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            rows.append((total / reps / 1000, event.count // reps, event.key))
    rows.sort(reverse=True)
    lines = ["| kernel | ms per fwd+bwd | launches |", "|---|---|---|"]
    lines += [f"| {name[:60]} | {ms:.3f} | {count} |" for ms, count, name in rows[:14]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048,2x8192", help="comma-separated BxT of the layer input")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--memories", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sweep", action="store_true", help="time several launch configs on the first shape")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of the first shape")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    H, D = args.heads, args.head_dim
    report = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{args.dtype}, scan heads {H} x {D}, E={args.memories} top-{args.topk} + shared"]

    if args.sweep:
        B, T = shapes[0]
        inputs = scan_inputs(mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(0)),
                             H, D, D, dtype, seed=0)
        lines = ["| launch config | fwd ms | fwd+bwd ms |", "|---|---|---|"]
        for cfg in (LaunchConfig(), LaunchConfig(state_block_v=64), LaunchConfig(state_block_v=16, state_warps=4),
                    LaunchConfig(state_stages=1), LaunchConfig(chunk_stages=1), LaunchConfig(solve_warps=2),
                    LaunchConfig(solve_warps=8)):
            scan_module.LAUNCH = cfg
            fields = ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
            try:
                lines.append(f"| {fields} | {time_scan(inputs, False):.3f} | {time_scan(inputs, True):.3f} |")
            except Exception as error:  # noqa: BLE001 - a config may not compile (registers, shared memory)
                lines.append(f"| {fields} | failed: {type(error).__name__} | |")
            print(lines[-1], flush=True)
        scan_module.LAUNCH = LaunchConfig()
        report += [f"\nLaunch configs at {B} x {T}:", *lines]

    if args.profile:
        B, T = shapes[0]
        inputs = scan_inputs(mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(0)),
                             H, D, D, dtype, seed=0)
        report += [f"\nKernel breakdown, MoM scan fwd+bwd at {B} x {T}:", kernel_breakdown(inputs)]
        print(report[-1], flush=True)

    table = ["| shape (B x T) | scan tokens (segments) | MoM scan fwd | MoM scan fwd+bwd | fwd TFLOP/s | "
             "1-stream scan fwd / fwd+bwd | SDPA 4x256 fwd / fwd+bwd | SDPA 16x64 fwd / fwd+bwd | "
             "scan peak GiB (fwd+bwd) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for B, T in shapes:
        lengths = mom_lengths(B, T, args.memories, args.topk, True, torch.Generator().manual_seed(B * T))
        inputs = scan_inputs(lengths, H, D, D, dtype, seed=1)
        fwd, fwd_bwd = time_scan(inputs, False), time_scan(inputs, True)
        tflops = scan_flops(sum(lengths), H, D, D) / fwd / 1e9
        single = scan_inputs([T] * B, H, D, D, dtype, seed=2)
        single_fwd, single_fb = time_scan(single, False), time_scan(single, True)
        sdpa_a = time_sdpa(B, T, H, D, dtype, False), time_sdpa(B, T, H, D, dtype, True)
        sdpa_b = time_sdpa(B, T, 16, 64, dtype, False), time_sdpa(B, T, 16, 64, dtype, True)
        q, k, v, g, beta, cu = inputs
        leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
        peak = peak_memory_gib(lambda: triton_scan(*leaves[:3], g=leaves[3], beta=leaves[4], cu_seqlens=cu,
                                                   output_final_state=False)[0].sum().backward())
        table.append(f"| {B} x {T} | {sum(lengths)} ({len(lengths)}) | {fwd:.3f} ms | {fwd_bwd:.3f} ms | "
                     f"{tflops:.0f} | {single_fwd:.3f} / {single_fb:.3f} ms | {sdpa_a[0]:.3f} / {sdpa_a[1]:.3f} ms | "
                     f"{sdpa_b[0]:.3f} / {sdpa_b[1]:.3f} ms | {peak:.2f} |")
        print(table[-1], flush=True)
    report += ["", *table]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

"""Time the MoM layer's Triton slot and mix stages (``mom_lit/ops/slots/kernels.py``) and sweep their launch settings
(CUDA).

Shapes are those of one layer at the ANCHORS.md setting: B x T tokens routed uniformly at random to top-2 of E = 4
memories plus the shared one (3 slots per token), 4 heads x 256, short convolution of width 4, bf16. Every kernel
is timed alone (``triton.testing.do_bench`` medians, ms) under each setting of a coordinate sweep: one kernel's
setting varies while the others keep the library's defaults. Every setting's results are compared with the
defaults' (largest absolute difference): a setting that computes something else is reported, never chosen.

    python tools/bench_stages.py --out stages.md            # times and sweep at 8 x 2048
    TRITON_INTERPRET=1 python tools/bench_stages.py --device cpu --tiny     # CPU smoke run (interpreted kernels)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_lit.layout import build_layout, sequence_ids  # noqa: E402
from mom_lit.ops.mix import kernels as mix_kernels  # noqa: E402
from mom_lit.ops.slots import kernels as slot_kernels  # noqa: E402
from mom_lit.ops.stage_launch import DEFAULT_LAUNCH, StageLaunch  # noqa: E402

from benchlib import bench, device_name, parse_shape, table_header, table_row  # noqa: E402


def time_kernel(fn, device: str) -> float:
    """Median milliseconds of ``fn()`` (CUDA: ``do_bench`` over 100 ms; CPU: three calls, for smoke runs)."""
    return bench(fn, device, rep_ms=100, warmup_ms=25, warmup=0, reps=3)


def make_inputs(batch: int, seq_len: int, heads: int, dim: int, memories: int, topk: int, width: int,
                dtype: torch.dtype, device: str, align: int = 16):
    gen = torch.Generator().manual_seed(0)
    tokens, streams = batch * seq_len, memories + 1
    memory = torch.rand(tokens, memories, generator=gen).topk(topk, -1).indices
    memory = torch.cat([memory, torch.full_like(memory[:, :1], memories)], 1)  # + shared memory
    layout = build_layout(memory, sequence_ids(batch, seq_len, None, "cpu"), batch, streams)
    layout = type(layout)(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(layout).items()})
    HK = heads * dim
    rand = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return dict(
        layout=layout, heads=heads, dim=dim, kv_rows=layout.token * streams + layout.memory,
        # projection rows padded to a multiple of ``align`` elements, as the layer lays them out (align 16)
        q_src=rand(tokens, HK), kv_src=rand(tokens * streams, -(-(2 * HK + 2 * heads) // align) * align),
        weight=rand(3 * HK, width),
        dout=rand(layout.token.numel(), heads, dim), o=rand(layout.token.numel(), heads, dim),
        mix_weight=torch.rand(tokens, topk + 1, device=device), gate=rand(tokens, heads, dim),
        norm_weight=rand(dim), mix_dout=rand(tokens, heads, dim))


def runners(x) -> dict[str, callable]:
    """One call per kernel group at the k stream's shapes (the largest of q, k, v that takes the L2 norm)."""
    lay, H, D = x["layout"], x["heads"], x["dim"]
    HK = H * D
    src, w = x["kv_src"][:, :HK], x["weight"][HK:2 * HK].contiguous()
    dst = torch.zeros_like(x["kv_src"])[:, :HK]

    def conv_fwd(launch):
        return slot_kernels.conv_fwd(src, x["kv_rows"], lay.position, w, H, D, True, launch=launch)

    def conv_bwd(launch):
        dweight = slot_kernels.conv_bwd(src, x["kv_rows"], lay.position, w, x["dout"], H, D, True, dst, x["kv_rows"],
                                launch=launch)
        return dst, dweight

    def mix_fwd(launch):
        return mix_kernels.mix_fwd(x["o"], lay.rank, x["mix_weight"], x["gate"], x["norm_weight"], 1e-5, launch)

    def mix_bwd(launch):
        return mix_kernels.mix_bwd(x["o"], lay.rank, x["mix_weight"], x["gate"], x["norm_weight"], x["mix_dout"], 1e-5,
                            launch)

    return {"conv_fwd": conv_fwd, "conv_bwd": conv_bwd, "mix_fwd": mix_fwd, "mix_bwd": mix_bwd}


def flat(result) -> list[torch.Tensor]:
    if torch.is_tensor(result):
        return [result]
    return [t for t in result if t is not None]


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference over all results, relative to each result's largest magnitude."""
    return max(((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-6)).item()
               for u, v in zip(a, b))


# Settings tried per field of StageLaunchConfig, and the runner that times it.
SWEEP = {
    "conv_fwd": ("conv_fwd", [StageLaunch(r, w) for r in (8, 16, 32, 64) for w in (2, 4, 8)]),
    "conv_bwd_pre": ("conv_bwd", [StageLaunch(r, w) for r in (8, 16, 32) for w in (2, 4, 8)]),
    "conv_bwd_dx": ("conv_bwd", [StageLaunch(r, w) for r in (8, 16, 32) for w in (2, 4, 8)]),
    "dx_channels": ("conv_bwd", [32, 64, 128]),
    "dx_span": ("conv_bwd", [256, 512, 1024, 2048]),
    "dx_kernel": ("conv_bwd", ["tiles", "taps"]),
    "mix_fwd": ("mix_fwd", [StageLaunch(r, w) for r in (8, 16, 32, 64) for w in (2, 4, 8)]),
    "mix_bwd": ("mix_bwd", [StageLaunch(r, w) for r in (8, 16, 32) for w in (2, 4, 8)]),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a smoke run under TRITON_INTERPRET=1 (fp32, the interpreter mishandles bf16)")
    p.add_argument("--tiny", action="store_true", help="2 x 40 tokens, 2 heads x 16, a short sweep")
    p.add_argument("--shape", type=parse_shape, default=(8, 2048), metavar="BxT", help="BxT of the layer input")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--no-sweep", action="store_true", help="time the library's settings only")
    p.add_argument("--fields", default=None, help="comma list: sweep only these fields of StageLaunchConfig")
    p.add_argument("--best-json", default=None, help="write the fastest setting per field here (JSON)")
    p.add_argument("--unaligned", action="store_true",
                   help="projection rows of 2 K + 2 heads elements (not padded to a multiple of 16)")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_stages.py needs a CUDA device (or --device cpu under TRITON_INTERPRET=1)")
    if args.tiny:
        args.shape, args.heads, args.head_dim = (2, 40), 2, 16
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    batch, seq_len = args.shape
    x = make_inputs(batch, seq_len, args.heads, args.head_dim, 4, 2, 4, dtype, args.device,
                    align=1 if args.unaligned else 16)
    run = runners(x)
    slots, channels = x["layout"].token.numel(), args.heads * args.head_dim
    card = device_name(args.device) + ("" if args.device == "cuda" else " (Triton interpreter)")
    lines = [f"Device: {card}, torch {torch.__version__}, triton {triton.__version__}; "
             f"{batch}x{seq_len}, {slots} slots x {channels} channels (one of q/k/v), {str(dtype)[6:]}, projection "
             f"rows of {x['kv_src'].shape[1]} elements", "",
             *table_header(["kernel group", "setting", "ms", "largest difference to the defaults (relative)"])]
    default = DEFAULT_LAUNCH
    reference = {name: [t.clone() for t in flat(fn(default))] for name, fn in run.items()}
    for name, fn in run.items():
        ms = time_kernel(functools.partial(fn, default), args.device)
        lines.append(table_row([name, "library defaults", f"{ms:.4f}", 0]))
        print(lines[-1], flush=True)
    best = {}
    sweep = {} if args.no_sweep else SWEEP
    if args.fields:
        unknown = set(args.fields.split(",")) - set(SWEEP)
        if unknown:
            p.error(f"unknown sweep fields {sorted(unknown)}; known: {sorted(SWEEP)}")
        sweep = {field: SWEEP[field] for field in args.fields.split(",")}
    if args.tiny:  # the first two settings of each field
        sweep = {field: (group, settings[:2]) for field, (group, settings) in sweep.items()}
    for field, (group, settings) in sweep.items():
        for setting in settings:
            try:
                cfg = dataclasses.replace(default, **{field: setting})
            except ValueError:  # an inconsistent setting (StageLaunchConfig says why)
                continue
            try:
                diff = largest_difference(flat(run[group](cfg)), reference[group])
                ms = time_kernel(functools.partial(run[group], cfg), args.device)
            except Exception as error:  # a setting that does not build (shared memory, registers) is reported
                lines.append(table_row([group, f"{field}={setting}", f"error: {type(error).__name__}", ""]))
                print(lines[-1], flush=True)
                continue
            lines.append(table_row([group, f"{field}={setting}", f"{ms:.4f}", f"{diff:.2e}"]))
            print(lines[-1], flush=True)
            if diff < 2e-2 and (field not in best or ms < best[field][1]):
                best[field] = (setting, ms)
    if best:
        lines += ["", "Fastest setting per field (others at the defaults):", ""]
        lines += [f"- {field}: {setting} ({ms:.4f} ms)" for field, (setting, ms) in best.items()]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    if args.best_json:
        Path(args.best_json).write_text(json.dumps(
            {field: (dataclasses.asdict(setting) if dataclasses.is_dataclass(setting) else setting)
             for field, (setting, _) in best.items()}))


if __name__ == "__main__":
    main()

"""CPU throughput of the chunked memory scan: compiled vs eager, forward + backward.

    python tools/bench_cpu.py                       # op alone (MoM layouts) and the model at two shapes
    python tools/bench_cpu.py --skip-model --reps 3
    python tools/bench_cpu.py --profile             # torch.profiler table of one compiled op step

(a) The op alone over the packed (row, memory) layout of one MoM layer: each token goes to its top-2 of 4 routed
memories plus the shared memory, so a batch of B x T tokens is 3 B T scanned tokens in 5 B segments of varying
length. (b) ``MoMForCausalLM`` with ``config.backend`` set to each path, ``model(ids, labels=ids).loss``
backpropagated. Throughput counts input tokens (scanned tokens for the op). Each number is the median of
``--reps`` timed steps after ``--warmup`` untimed ones (the first compiled step compiles). The table is markdown.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mom_lit.ops.scan import scan

RULE_INPUTS = {"gated_delta": ("g", "beta"), "delta": ("beta",), "simple_gla": ("g",), "gla": ("gk",),
               "linear": ()}


@dataclass
class Row:
    case: str
    tokens: int
    eager_s: float
    compiled_s: float

    def markdown(self) -> str:
        speedup = self.eager_s / self.compiled_s
        return (f"| {self.case} | {self.tokens} | {self.tokens / self.eager_s:,.0f} | "
                f"{self.tokens / self.compiled_s:,.0f} | {speedup:.2f}x |")


def median_seconds(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median step time of each variant; timed steps alternate between variants so load drifts hit all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mom_segment_lengths(batch: int, seq_len: int, memories: int, topk: int, gen: torch.Generator) -> list[int]:
    """Per row: the E routed memories' token counts (uniform random top-k routing), then the shared memory's."""
    lengths: list[int] = []
    for _ in range(batch):
        choice = torch.rand(seq_len, memories, generator=gen).topk(topk, dim=-1).indices  # (T, k) distinct
        lengths += torch.bincount(choice.flatten(), minlength=memories).tolist() + [seq_len]
    return lengths


def op_step(rule: str, batch: int, seq_len: int, heads: int, dim: int, backend: str, chunk_size: int,
            seed: int = 0) -> tuple[Callable[[], None], int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = mom_segment_lengths(batch, seq_len, memories=4, topk=2, gen=gen)
    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    leaves = {
        "q": torch.randn(1, total, heads, dim, generator=gen),
        "k": F.normalize(torch.randn(1, total, heads, dim, generator=gen), dim=-1),
        "v": torch.randn(1, total, heads, dim, generator=gen),
        "g": F.logsigmoid(torch.randn(1, total, heads, generator=gen) + 2),
        "gk": F.logsigmoid(torch.randn(1, total, heads, dim, generator=gen) + 2) / 16,
        "beta": torch.rand(1, total, heads, generator=gen),
        "initial_state": torch.zeros(len(lengths), heads, dim, dim),
    }
    used = {n: t.requires_grad_() for n, t in leaves.items()
            if n in ("q", "k", "v", "initial_state") or n in RULE_INPUTS[rule]}
    grad_o = torch.randn(1, total, heads, dim, generator=gen)

    def step() -> None:
        o, final = scan(used["q"], used["k"], used["v"], g=used.get("g"), gk=used.get("gk"), beta=used.get("beta"),
                        initial_state=used["initial_state"], cu_seqlens=cu_seqlens, backend=backend,
                        chunk_size=chunk_size)
        torch.autograd.backward([o, final], [grad_o, torch.ones_like(final)])

    return step, total


def model_step(preset: str, batch: int, seq_len: int, backend: str, seed: int = 0) -> tuple[Callable[[], None], int]:
    from mom_lit import MoMConfig, MoMForCausalLM

    torch.manual_seed(seed)
    model = MoMForCausalLM(MoMConfig.from_preset(preset, backend=backend))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return step, batch * seq_len


def profile_compiled_op(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    step, _ = op_step("gated_delta", args.op_batch, args.op_seq_len, 2, 32, "compiled", args.chunk_size)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=["gated_delta", "gla"], choices=list(RULE_INPUTS))
    parser.add_argument("--op-batch", type=int, default=4)
    parser.add_argument("--op-seq-len", type=int, default=512)
    parser.add_argument("--op-heads", nargs="+", type=int, default=[2, 4], help="heads per case, paired with --op-dims")
    parser.add_argument("--op-dims", nargs="+", type=int, default=[32, 64], help="head dim (K = V) per case")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["quickstart:16x256", "quickstart:2x2048", "debug:2x2048"],
                        help="preset:BATCHxSEQ_LEN")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile_compiled_op(args)
        return

    rows: list[Row] = []
    for rule in args.rules:
        for heads, dim in zip(args.op_heads, args.op_dims):
            steps = {}
            for backend in ("eager", "compiled"):
                steps[backend], tokens = op_step(rule, args.op_batch, args.op_seq_len, heads, dim, backend,
                                                 args.chunk_size)
            seconds = median_seconds(steps, args.warmup, args.reps)
            rows.append(Row(f"op {rule} B={args.op_batch} T={args.op_seq_len} H={heads} K=V={dim} "
                            f"C={args.chunk_size}", tokens, seconds["eager"], seconds["compiled"]))
            print(rows[-1].markdown(), flush=True)
    if not args.skip_model:
        for spec in args.models:
            preset, shape = spec.split(":")
            batch, seq_len = (int(x) for x in shape.split("x"))
            steps = {}
            for backend in ("eager", "compiled"):
                steps[backend], tokens = model_step(preset, batch, seq_len, backend)
            seconds = median_seconds(steps, args.warmup, args.reps)
            rows.append(Row(f"model {preset} B={batch} T={seq_len}", tokens, seconds["eager"], seconds["compiled"]))
            print(rows[-1].markdown(), flush=True)

    print(f"\nCPU, {torch.get_num_threads()} threads, torch {torch.__version__}; fwd+bwd, median of {args.reps}\n")
    print("| case | tokens/step | eager tok/s | compiled tok/s | speedup |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row.markdown())


if __name__ == "__main__":
    main()

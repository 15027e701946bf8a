"""CPU throughput of the chunked memory scan: compiled vs eager, forward + backward.

    python tools/bench_cpu.py                       # op alone (MoM layouts) and the model at two shapes
    python tools/bench_cpu.py --skip-model --reps 3
    python tools/bench_cpu.py --profile             # torch.profiler table of one compiled op step
    python tools/bench_cpu.py --quickstart-steps --vs-tree ../other-checkout --rounds 3


(a) The op alone over the packed (row, memory) layout of one MoM layer: each token goes to its top-2 of 4 routed
memories plus the shared memory, so a batch of B x T tokens is 3 B T scanned tokens in 5 B segments of varying
length. (b) ``MoMForCausalLM`` with ``config.backend`` set to each path, ``model(ids, labels=ids).loss``
backpropagated. Throughput counts input tokens (scanned tokens for the op). Each number is the median of
``--reps`` timed steps after ``--warmup`` untimed ones (the first compiled step compiles). The table is markdown.

(c) ``--quickstart-steps``: whole training steps of the quickstart model (``configs/quickstart.yaml``'s fields,
default scan path, fp32: forward, backward, gradient clipping at 1.0 and an AdamW step) on a packed batch of
16 x 256 tokens, each measurement in its own process. With ``--vs-tree PATH`` the same worker runs on the package
of another checkout (``PYTHONPATH=PATH``), and this tree's and the other's processes alternate, round after round
and for every ``--thread-counts`` value, so load drifts of a shared machine hit both alike. Each process reports
its first step (the scan's compilation included: ``--compile-cache fresh`` gives every process an empty
``torch.compile`` cache, ``shared`` uses the user's) and the median steps/s of ``--steps`` timed steps after
``--warmup`` untimed ones; the table gives the median and range over rounds and the median of the per-round ratios.
The worker only uses ``MoMConfig``, ``MoMForCausalLM`` and ``model(ids, targets=..., cu_seqlens=...)``, so it runs
on older checkouts too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from benchlib import bench

ROOT = Path(__file__).resolve().parents[1]

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

    from mom_lit.ops.scan import scan

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


# --- (c) quickstart training steps, this tree against another checkout ------------------------------------------

QUICKSTART_MODEL = dict(hidden_size=128, num_layers=4, num_heads=2, head_dim=32, num_memories=4, topk=2,
                        shared_memory=True, vocab_size=256)  # configs/quickstart.yaml (byte vocabulary)
QUICKSTART_BATCH = (16, 256)


def quickstart_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed (1, B*T) batch as the quickstart's data module makes it: a segment per row, plus a few document
    boundaries inside rows (scenes are a few thousand bytes long). Returns ids, targets and cu_seqlens."""
    batch, seq_len = QUICKSTART_BATCH
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, QUICKSTART_MODEL["vocab_size"], (1, batch * seq_len + 1), generator=gen)
    starts = set(range(0, batch * seq_len, seq_len)) | {1000, 2900}  # row starts and two documents' starts
    cu_seqlens = torch.tensor(sorted(starts) + [batch * seq_len], dtype=torch.int32)
    return ids[:, :-1], ids[:, 1:], cu_seqlens


def quickstart_worker(threads: int, warmup: int, steps: int) -> dict[str, object]:
    """Time the quickstart training step in this process (the ``mom_lit`` on ``sys.path``)."""
    from mom_lit import MoMConfig, MoMForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**QUICKSTART_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    ids, targets, cu_seqlens = quickstart_batch()

    def step() -> None:
        model(ids, targets=targets, cu_seqlens=cu_seqlens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    median_ms = bench(step, "cpu", warmup=warmup, reps=steps)
    import mom_lit

    return {"first_step_s": first, "steps_per_s": 1e3 / median_ms, "threads": threads,
            "package": str(Path(mom_lit.__file__).resolve().parent)}


def run_quickstart_worker(tree: Path, threads: int, warmup: int, steps: int, cache: str) -> dict[str, object]:
    """One worker process on the package of ``tree``; its result line."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="bench-cpu-inductor-") as fresh:
        if cache == "fresh":
            env["TORCHINDUCTOR_CACHE_DIR"] = fresh
        cmd = [sys.executable, str(Path(__file__).resolve()), "--quickstart-worker", "--threads", str(threads),
               "--warmup", str(warmup), "--steps", str(steps)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the quickstart worker on {tree} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["package"]) != (tree / "mom_lit").resolve():
        raise RuntimeError(f"the worker for {tree} imported mom_lit from {result['package']}")
    return result


def spread(values: list[float], fmt: str) -> str:
    """Median and range of ``values``."""
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def compare_quickstart(args: argparse.Namespace) -> None:
    trees = {"this tree": ROOT}
    if args.vs_tree is not None:
        other = Path(args.vs_tree).resolve()
        if not (other / "mom_lit" / "__init__.py").is_file():
            raise SystemExit(f"--vs-tree {args.vs_tree}: no mom_lit package there")
        trees["other tree"] = other
    results: dict[tuple[str, int], list[dict[str, object]]] = {(n, t): [] for n in trees for t in args.thread_counts}
    for round_index in range(args.rounds):
        for threads in args.thread_counts:
            # alternate which tree goes first, so neither always runs right after the other's compilation
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                result = run_quickstart_worker(trees[name], threads, args.warmup, args.steps, args.compile_cache)
                results[(name, threads)].append(result)
                print(f"round {round_index + 1}/{args.rounds}, {threads} thread(s), {name}: first step "
                      f"{result['first_step_s']:.1f} s, {result['steps_per_s']:.3f} steps/s", flush=True)

    print(f"\nquickstart training step (B x T = {QUICKSTART_BATCH[0]} x {QUICKSTART_BATCH[1]}, fp32, default scan "
          f"path), torch {torch.__version__}, {args.rounds} rounds x {args.steps} timed steps after {args.warmup}, "
          f"compile cache {args.compile_cache}; median (range) over rounds")
    for name, tree in trees.items():
        print(f"- {name}: {tree}")
    print("\n| tree | threads | first step s | steps/s | ratio to other (per-round median) |")
    print("|---|---|---|---|---|")
    for threads in args.thread_counts:
        for name in trees:
            runs = results[(name, threads)]
            ratio = ""
            if len(trees) == 2 and name == "this tree":
                pairs = zip(runs, results[("other tree", threads)])
                ratio = spread([a["steps_per_s"] / b["steps_per_s"] for a, b in pairs], ".2f") + "x"
            print(f"| {name} | {threads} | {spread([r['first_step_s'] for r in runs], '.1f')} | "
                  f"{spread([r['steps_per_s'] for r in runs], '.3f')} | {ratio} |")


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
    parser.add_argument("--quickstart-steps", action="store_true",
                        help="time whole quickstart training steps in subprocesses (see (c) above)")
    parser.add_argument("--vs-tree", default=None, help="with --quickstart-steps: another checkout to compare with")
    parser.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per quickstart process")
    parser.add_argument("--compile-cache", choices=["fresh", "shared"], default="fresh")
    parser.add_argument("--quickstart-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quickstart_worker:
        print(json.dumps(quickstart_worker(args.threads or 1, args.warmup, args.steps)))
        return
    if args.quickstart_steps:
        for name in ("rounds", "steps"):
            if getattr(args, name) < 1:
                raise SystemExit(f"--{name} must be >= 1")
        if min(args.thread_counts) < 1:
            raise SystemExit("--thread-counts must be >= 1")
        compare_quickstart(args)
        return
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

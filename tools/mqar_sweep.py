"""MQAR sweep: MoM against single-memory Gated DeltaNet, and accuracy against the number of memories.

Every run trains through the project's command line in a worker process (``cli_main(["fit", "--config",
"configs/mqar.yaml", ...overrides])``, what ``python -m mom_lit fit`` runs), then evaluates on two held-out
MQAR splits of the same data module: a validation split (used only to choose the learning rate, see
``tools/plot_mqar.py``) and a test split (the reported accuracy). Train, validation and test examples come from
disjoint random streams. The data (examples and their order) depends on the run's seed only, so every variant
of one seed sees the same batches in the same order; the seed also seeds the model's initialisation.

A pool of ``--workers`` processes runs the runs in turn, many at once on one GPU (the tiny models leave most of
it idle), so a whole sweep fits a few minutes. Each run trains a fixed number of steps (``--steps``, one pass
over ``steps x batch_size`` fresh examples mixed over the K slices) and is evaluated once at the end. With
``--time_budget_s`` no run starts that would not end in time, and each run is capped at the time left; runs
left out are listed in the summary as not run.

Variants (per layer the recurrent state is streams x heads x head_dim x head_dim*expand_v):

* ``compare``: ``mom`` (4 memories, top-2 + shared: 5 stored, 3 active), ``gdn_total`` (one memory,
  expand_v=5: equal total state) and ``gdn_active`` (one memory, expand_v=3: equal active state).
* ``memories``: E = 1, 2, 4, 8 memories at activation ratio 0.5 (top-k = E/2, top-1 of 1 for E=1), with
  (``e{E}_shared``; ``mom`` for E=4) and without (``e{E}``) the shared memory.

The summary JSON (``--out``) is rewritten after every run, so an interrupted sweep keeps what finished; it lists
every run (variant, E, top-k, shared, T, seed, lr, validation and test accuracy per K, state sizes, parameters,
steps, wall time) including those not run. ``tools/plot_mqar.py`` draws it.

Usage on one GPU (docs/mqar.md gives the two side-by-side sweeps recommended for an ~8-minute budget, and how
their time was estimated)::

    python tools/mqar_sweep.py --out mqar.json --variants compare --seq_lens 256 512 --seeds 0 1 2 \
        --lrs 3e-3 1e-2 --steps 600 --workers 8 --time_budget_s 400

Tiny CPU smoke run::

    python tools/mqar_sweep.py --out /tmp/mqar.json --variants mom gdn_total --seq_lens 32 --kv_pairs 2 4 \\
        --vocab_size 64 --steps 20 --seeds 0 --lrs 3e-3 --workers 2 --set model.config.backend=eager
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mqar.yaml"


@dataclass(frozen=True)
class Variant:
    """Memory layout of one model; everything else comes from ``configs/mqar.yaml`` (and ``--set``)."""

    num_memories: int
    topk: int
    shared_memory: bool
    expand_v: float = 1.0

    def overrides(self) -> list[str]:
        return [
            f"--model.config.num_memories={self.num_memories}",
            f"--model.config.topk={self.topk}",
            f"--model.config.shared_memory={str(self.shared_memory).lower()}",
            f"--model.config.expand_v={self.expand_v}",
        ]


VARIANTS: dict[str, Variant] = {
    "mom": Variant(4, 2, True),
    # Equal state against mom: 4 + 1 streams stored, 2 + 1 active, each of head_dim x head_dim per head.
    "gdn_total": Variant(1, 1, False, 5.0),
    "gdn_active": Variant(1, 1, False, 3.0),
    "e1": Variant(1, 1, False),
    "e1_shared": Variant(1, 1, True),
    "e2": Variant(2, 1, False),
    "e2_shared": Variant(2, 1, True),
    "e4": Variant(4, 2, False),
    "e8": Variant(8, 4, False),
    "e8_shared": Variant(8, 4, True),
}
GROUPS: dict[str, list[str]] = {
    "compare": ["mom", "gdn_total", "gdn_active"],
    "memories": ["e1", "e1_shared", "e2", "e2_shared", "e4", "mom", "e8", "e8_shared"],
}
GROUPS["all"] = list(dict.fromkeys(GROUPS["compare"] + GROUPS["memories"]))


def expand_variants(names: list[str]) -> list[str]:
    """Variant and group names -> variant names, in order, without repeats."""
    out: list[str] = []
    for name in names:
        if name in GROUPS:
            out.extend(GROUPS[name])
        elif name in VARIANTS:
            out.append(name)
        else:
            raise ValueError(f"--variants: unknown name {name!r}; variants: {sorted(VARIANTS)}, "
                             f"groups: {sorted(GROUPS)}")
    return list(dict.fromkeys(out))


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """Every run of the sweep, seed-major so that a time budget cuts whole later seeds first."""
    runs = []
    for seed in args.seeds:
        for seq_len in args.seq_lens:
            for lr in args.lrs:
                for name in args.variants:
                    run_id = f"{name}-T{seq_len}-s{seed}-lr{lr:g}"
                    runs.append({"run_id": run_id, "variant": name, **asdict(VARIANTS[name]), "seq_len": seq_len,
                                 "seed": seed, "lr": lr})
    return runs


def _max_time(seconds: float) -> str:
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cli_args(run: dict, settings: dict, max_time_s: float | None) -> list[str]:
    """The ``fit`` command line of one run."""
    kv = "[" + ",".join(str(k) for k in settings["kv_pairs"]) + "]"
    steps, batch = settings["steps"], settings["batch_size"]
    # One pass over fresh examples: the K slices share steps x batch examples (rounded up per slice).
    per_slice = math.ceil(steps * batch / len(settings["kv_pairs"]))
    args = [
        "fit", "--config", str(CONFIG),
        f"--seed_everything={run['seed']}",
        f"--trainer.precision={settings['precision']}",
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.log_every_n_steps={max(1, steps // 10)}",
        f"--trainer.logger.init_args.save_dir={settings['run_dir']}/tb",
        f"--trainer.logger.init_args.name={run['run_id']}",
        "--trainer.logger.init_args.version=0",
        f"--data.init_args.vocab_size={settings['vocab_size']}",
        f"--data.init_args.seq_len={run['seq_len']}",
        f"--data.init_args.train_num_kv_pairs={kv}",
        f"--data.init_args.test_num_kv_pairs={kv}",
        f"--data.init_args.num_train_examples={per_slice}",
        f"--data.init_args.num_val_examples={settings['val_examples']}",
        f"--data.init_args.num_test_examples={settings['test_examples']}",
        f"--data.init_args.batch_size={batch}",
        f"--data.init_args.seed={run['seed']}",
        f"--model.lr={run['lr']}",
        f"--model.warmup_steps={settings['warmup_steps']}",
        *VARIANTS[run["variant"]].overrides(),
        *("--" + item for item in settings["set"]),
    ]  # fmt: skip
    if max_time_s is not None:
        args.append(f"--trainer.max_time={_max_time(max_time_s)}")
    return args


def _slice_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in sorted(metrics.items()) if k.startswith(prefix)}


def _init_worker(log_dir: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:  # torch.compile's default pool of compile processes per worker would oversubscribe the cores
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    except (ImportError, AttributeError):
        pass
    sys.argv = sys.argv[:1]  # each run's command line is its `args`; the sweep's own must not reach LightningCLI
    # Lightning and torch write to stdout/stderr: keep each worker's output in its own file, read on failure.
    log = os.open(Path(log_dir) / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps what was written, so a refused command line's message is recorded."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def last_line(self) -> str:
        lines = [line for line in self.kept.getvalue().splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def train_one(run: dict, settings: dict, max_time_s: float | None) -> dict:
    """Train and evaluate one run in this process; returns the run's record (status done, truncated or failed)."""
    import gc

    import torch

    from mom_lit.training.cli import cli_main
    from mom_lit.training.flops import active_streams, matmul_flops_per_token

    print(f"=== {run['run_id']}", flush=True)
    record = dict(run, log=f"worker-{os.getpid()}.log")
    start = time.perf_counter()
    stderr = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(stderr):
            cli = cli_main(args=cli_args(run, settings, max_time_s))
        trainer, model = cli.trainer, cli.model
        fit_s = time.perf_counter() - start
        val = _slice_metrics(trainer.callback_metrics, "val/acc_slice")
        test = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
        c = model.config
        state_per_stream = c.num_heads * c.head_dim * c.head_v_dim
        record.update(
            status="done" if trainer.global_step == settings["steps"] and val else "truncated",
            steps=trainer.global_step,
            val_acc=val,
            test_acc=_slice_metrics(test, "test/acc_slice"),
            num_layers=c.num_layers,
            state_per_layer=c.num_streams * state_per_stream,
            active_state_per_layer=active_streams(c) * state_per_stream,
            params=sum(p.numel() for p in model.model.parameters()),
            active_matmul_params=matmul_flops_per_token(c) // 2,
            fit_s=round(fit_s, 1),
        )
        del cli, trainer, model
    except (Exception, SystemExit) as error:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
        traceback.print_exc()
        if isinstance(error, SystemExit) and stderr.last_line():  # the parser's one-line message, not "2"
            error = SystemExit(stderr.last_line())
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    record["wall_s"] = round(time.perf_counter() - start, 1)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"=== {run['run_id']}: {record['status']} in {record['wall_s']} s", flush=True)
    return record


def _write_json(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)


def _check_out(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise SystemExit(f"--out {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"--out {path}: folder {parent} is not writable")


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="summary JSON, rewritten after every run")
    p.add_argument("--run_dir", type=Path, default=None,
                   help="scratch folder for logs, TensorBoard files and checkpoints (default: a new temporary one)")
    p.add_argument("--variants", nargs="+", default=["all"], help=f"variants or groups {sorted(GROUPS)}")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[256, 512])
    p.add_argument("--kv_pairs", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--warmup_steps", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--val_examples", type=int, default=250, help="validation examples per K (lr choice)")
    p.add_argument("--test_examples", type=int, default=1000, help="test examples per K (reported accuracy)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="runs trained at once (processes); default: CPU cores, at most 16")
    p.add_argument("--threads_per_worker", type=int, default=None, help="default: CPU cores / workers")
    p.add_argument("--precision", default="auto", help="Trainer precision; auto: bf16-mixed on CUDA, else 32-true")
    p.add_argument("--time_budget_s", type=float, default=None,
                   help="start no run that would end later than this many seconds after the start")
    p.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                   help="extra CLI overrides for every run, e.g. model.config.hidden_size=256")
    args = p.parse_args(argv)
    try:
        args.variants = expand_variants(args.variants)
    except ValueError as error:
        p.error(str(error))
    for name in ("steps", "batch_size", "workers", "val_examples", "test_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        p.error(f"--time_budget_s must be positive, got {args.time_budget_s}")
    for item in args.set:
        if "=" not in item or item.startswith("-"):
            p.error(f"--set {item!r}: expected KEY=VALUE without leading dashes, e.g. model.config.hidden_size=256")
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 10)
    if args.threads_per_worker is None:
        args.threads_per_worker = max(1, (os.cpu_count() or 1) // args.workers)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_out(args.out)
    # Task sizes every run would reject (a K too large for T) fail here, not in every worker.
    from mom_lit.data.mqar import MQARDataModule

    for seq_len in args.seq_lens:
        try:
            MQARDataModule(vocab_size=args.vocab_size, seq_len=seq_len, train_num_kv_pairs=args.kv_pairs,
                           test_num_kv_pairs=args.kv_pairs, num_train_examples=args.steps * args.batch_size,
                           num_val_examples=args.val_examples, num_test_examples=args.test_examples,
                           batch_size=args.batch_size)
        except ValueError as error:
            raise SystemExit(f"--seq_lens {seq_len} with --kv_pairs/--vocab_size/--batch_size: {error}") from None
    if args.precision == "auto":
        import torch

        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    run_dir = args.run_dir or Path(tempfile.gettempdir()) / f"mqar_sweep_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["run_dir"] = str(run_dir)
    runs = plan_runs(args)
    # The first run's command line parsed and built (nothing trained): a bad --set fails here, with the
    # parser's message, rather than once per run in the workers.
    from mom_lit.training.cli import MoMLightningCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # the sweep's own options are not the CLI's
    try:
        MoMLightningCLI(args=cli_args(runs[0], settings, None)[1:], run=False)
    except SystemExit as error:
        if error.code not in (0, None):
            raise SystemExit("mqar_sweep: the command line of the first run was refused (the parser's message is "
                             "above); check --set") from None
    finally:
        sys.argv = argv
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs = plan_runs(args)
    summary = {"settings": settings, "command": [sys.executable, *sys.argv], "device": _device(), "runs": []}
    print(f"{len(runs)} runs ({len(args.variants)} variants x {len(args.seq_lens)} T x {len(args.seeds)} seeds x "
          f"{len(args.lrs)} lrs) on {args.workers} workers, {summary['device']}; logs in {run_dir}/logs", flush=True)

    start = time.perf_counter()
    pending = list(runs)
    records: dict[str, dict] = {}
    walls: list[float] = []
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker,
                                     initargs=(str(run_dir / "logs"), args.threads_per_worker)) as pool:
        in_flight: dict[futures.Future, dict] = {}

        def launch() -> None:
            while pending and len(in_flight) < args.workers:
                elapsed = time.perf_counter() - start
                left = None if args.time_budget_s is None else args.time_budget_s - elapsed
                expected = statistics.median(walls) if walls else 0.0
                if left is not None and left < max(expected, 1.0):
                    for run in pending:
                        records[run["run_id"]] = dict(run, status="not_run", reason="time budget")
                    pending.clear()
                    return
                run = pending.pop(0)
                in_flight[pool.submit(train_one, run, settings, left)] = run

        launch()
        while in_flight:
            done, _ = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            for future in done:
                run = in_flight.pop(future)
                try:
                    record = future.result()
                except Exception as error:  # the worker process died (e.g. killed): record it, go on
                    record = dict(run, status="failed", error=f"{type(error).__name__}: {error}")
                records[run["run_id"]] = record
                if record["status"] in ("done", "truncated"):
                    walls.append(record["wall_s"])
                finished = sum(r["status"] != "not_run" for r in records.values())
                elapsed = time.perf_counter() - start
                per_run = statistics.mean(walls) if walls else 0.0
                eta = math.ceil((len(pending) + len(in_flight)) / args.workers) * per_run
                acc = " ".join(f"K{k}={a:.2f}" for k, a in record.get("test_acc", {}).items())
                steps_done = sum(r.get("steps", 0) for r in records.values())
                print(f"[{finished}/{len(runs)}] {run['run_id']}: {record['status']} {acc} "
                      f"({record.get('wall_s', '?')} s); elapsed {elapsed:.0f} s, {steps_done / elapsed:.0f} steps/s "
                      f"in all, ETA {eta:.0f} s", flush=True)
                if record["status"] == "failed":
                    print(f"  {record['error'][:500]}  (log: {run_dir}/logs/{record.get('log', '')})", flush=True)
                launch()
                summary["runs"] = [records[r["run_id"]] for r in runs if r["run_id"] in records]
                summary["wall_s"] = round(elapsed, 1)
                _write_json(args.out, summary)
    summary["runs"] = [records.get(r["run_id"], dict(r, status="not_run", reason="interrupted")) for r in runs]
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    _write_json(args.out, summary)
    counts = {s: sum(r["status"] == s for r in summary["runs"]) for s in ("done", "truncated", "failed", "not_run")}
    print(f"wrote {args.out}: {counts} in {summary['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

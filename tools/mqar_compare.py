"""MQAR comparison of MoM against single-memory Gated DeltaNet baselines, small enough for a CPU by default.

Every variant is trained through the normal command line (``python -m mom_lit fit --config configs/mqar.yaml``)
with overrides that shrink the task (small vocabulary, short sequences, two key-value slices, few steps); the
per-slice validation accuracies ``val/acc_slice{K}`` are then read back from the TensorBoard event files and
written as a markdown table and a plot.

Variants (per layer, recurrent state = memories x heads x key width x value width):

* ``mom``: 4 routed memories (top-2) + a shared one, 2 heads x (32 x 32): 10,240 entries stored, 6,144 active.
* ``gdn_total``: one memory with ``expand_v=5``, 2 heads x (32 x 160): 10,240 entries (equal total state).
* ``gdn_active``: one memory with ``expand_v=3``, 2 heads x (32 x 96): 6,144 entries (equal active state).

Usage::

    python tools/mqar_compare.py --out-dir runs_mqar --max-steps 400
    python tools/mqar_compare.py --out-dir runs_mqar --report-only   # re-read existing runs

On a GPU, closer to the paper's task sizes (docs/mqar.md; one variant per card with ``--variants`` and
``CUDA_VISIBLE_DEVICES``, then ``--report-only`` over the same ``--out-dir``)::

    python tools/mqar_compare.py --out-dir runs_mqar_gpu --vocab-size 8192 --seq-len 256 --kv-pairs 16 32 64 \
        --train-examples 20000 --test-examples 1000 --batch-size 64 --max-steps 4000 --warmup-steps 200 \
        --png docs/mqar_gpu.png

The plot needs matplotlib, which is not a dependency of the project (``pip install matplotlib``); without it
the script stops with a clear message before training anything.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "mom": ("MoM 4 memories top-2 + shared (state 10,240 / active 6,144)", []),
    "gdn_total": (
        "Gated DeltaNet, 1 memory, expand_v=5 (state 10,240)",
        [
            "--model.config.num_memories=1",
            "--model.config.topk=1",
            "--model.config.shared_memory=false",
            "--model.config.expand_v=5",
        ],
    ),
    "gdn_active": (
        "Gated DeltaNet, 1 memory, expand_v=3 (state 6,144)",
        [
            "--model.config.num_memories=1",
            "--model.config.topk=1",
            "--model.config.shared_memory=false",
            "--model.config.expand_v=3",
        ],
    ),
}


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("tools/mqar_compare.py needs matplotlib for the plot (not a project dependency): pip install matplotlib")
    return plt


def _task_overrides(args: argparse.Namespace) -> list[str]:
    kv = "[" + ",".join(str(k) for k in args.kv_pairs) + "]"
    return [
        f"--seed_everything={args.seed}",
        "--trainer.precision=32-true",  # bf16 autocast on CPU is slower and adds nothing at this size
        f"--trainer.max_steps={args.max_steps}",
        "--trainer.max_epochs=10000",  # max_steps decides
        f"--trainer.max_time={args.max_time}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=10",
        f"--data.init_args.vocab_size={args.vocab_size}",
        f"--data.init_args.seq_len={args.seq_len}",
        f"--data.init_args.train_num_kv_pairs={kv}",
        f"--data.init_args.test_num_kv_pairs={kv}",
        f"--data.init_args.num_train_examples={args.train_examples}",
        f"--data.init_args.num_test_examples={args.test_examples}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--model.lr={args.lr}",
        f"--model.warmup_steps={args.warmup_steps}",
    ]


def _run(name: str, extra: list[str], args: argparse.Namespace) -> float:
    cmd = [
        sys.executable, "-m", "mom_lit", "fit", "--config", str(REPO / "configs" / "mqar.yaml"),
        *_task_overrides(args), *extra,
        f"--trainer.logger.init_args.save_dir={args.out_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(Path(args.out_dir) / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    (Path(args.out_dir) / f"{name}.wall").write_text(f"{wall:.1f}\n")
    print(f"{name}: {wall:.0f} s", flush=True)
    return wall


def _read_slices(run_dir: Path) -> dict[int, list[tuple[int, float]]]:
    """``{K: [(step, accuracy), ...]}`` from the event files of one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    out: dict[int, list[tuple[int, float]]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("val/acc_slice"):
            out[int(tag.removeprefix("val/acc_slice"))] = [(e.step, e.value) for e in acc.Scalars(tag)]
    if not out:
        raise ValueError(f"no val/acc_slice* scalars in {run_dir}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs_mqar")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--train-examples", type=int, default=1600, help="per slice")
    p.add_argument("--test-examples", type=int, default=256, help="per slice")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--max-time", default="00:00:05:00", help="Lightning DD:HH:MM:SS safety cap per run")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="skip training, re-read existing runs")
    p.add_argument("--png", default=str(REPO / "docs" / "mqar.png"))
    args = p.parse_args()
    plt = _require_matplotlib()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        for name in args.variants:
            _run(name, VARIANTS[name][1], args)

    results = {name: _read_slices(Path(args.out_dir) / name / "version_0") for name in args.variants}
    walls = {}
    for name in args.variants:
        wall_file = Path(args.out_dir) / f"{name}.wall"
        walls[name] = wall_file.read_text().strip() if wall_file.exists() else "?"

    slices = sorted({k for r in results.values() for k in r})
    head = "| variant | steps | " + " | ".join(f"acc K={k} (final)" for k in slices) + " | wall s |"
    print(head)
    print("|" + "---|" * (len(slices) + 3))
    for name, res in results.items():
        final = [res[k][-1][1] if k in res else float("nan") for k in slices]
        step = max(s for r in res.values() for s, _ in r) + 1
        print(f"| {VARIANTS[name][0]} | {step} | " + " | ".join(f"{a:.3f}" for a in final) + f" | {walls[name]} |")

    fig, axes = plt.subplots(1, len(slices), figsize=(4.5 * len(slices), 3.6), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], slices):
        for name, res in results.items():
            if k in res:
                steps, acc = zip(*res[k])
                ax.plot([s + 1 for s in steps], acc, marker="o", label=name)
        ax.axhline(2 / args.vocab_size, color="grey", ls=":", lw=1, label="chance (1 / #values)")
        ax.set_title(f"MQAR, K={k} pairs, T={args.seq_len}, V={args.vocab_size}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

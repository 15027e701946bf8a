"""Plots and a table from the summary JSON of ``tools/mqar_sweep.py``.

The learning rate of each (variant, T) is chosen on the validation split: the lr whose runs have the highest
validation accuracy, averaged over the K slices and the seeds (ties go to the smaller lr). Only complete runs
count, and only lrs that completed for every seed that the variant ran at T compete, so a seed missing at one lr
cannot make it look better. The test accuracy of the chosen lr is what is plotted and tabulated: its mean over
seeds with the spread (min to max) across seeds.

Draws:

* ``--acc_png``: test accuracy against K, one panel per T, one line per variant (state sizes in the legend);
* ``--memories_png``: test accuracy (mean over K) against the number of memories E at top-k = E/2, with and
  without the shared memory, one panel per T.

Usage::

    python tools/plot_mqar.py docs/mqar_compare.json docs/mqar_memories.json --acc_png docs/mqar_acc_vs_k.png \\
        --memories_png docs/mqar_memories.png

The plots need matplotlib, which is not a dependency of the project (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load_runs(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(summaries, runs that finished all their steps) of one or more sweep summaries.

    Sweeps run side by side (e.g. the comparison and the memory count in two processes) may both hold a run of
    the same variant, T, seed and lr: the first one read is kept.
    """
    summaries, done, seen = [], [], set()
    for path in paths:
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: cannot read the sweep summary: {error}") from None
        if not isinstance(summary, dict) or "runs" not in summary or "settings" not in summary:
            raise SystemExit(f"{path}: not a tools/mqar_sweep.py summary (no 'runs' or 'settings')")
        summaries.append(summary)
        for r in summary["runs"]:
            key = (r["variant"], r["seq_len"], r["seed"], r["lr"])
            if r.get("status") == "done" and key not in seen:
                seen.add(key)
                done.append(r)
    tasks = {(s["settings"]["vocab_size"], s["settings"]["steps"], s["settings"]["batch_size"],
              tuple(s["settings"]["kv_pairs"])) for s in summaries}
    if len(tasks) > 1:
        raise SystemExit(f"the summaries come from different tasks (vocab, steps, batch, K): {sorted(tasks)}")
    return summaries, done


def _mean_acc(accuracy: dict[str, float]) -> float:
    return statistics.mean(accuracy.values())


def select_lr(runs: list[dict]) -> dict[tuple[str, int], float]:
    """{(variant, T): lr with the best validation accuracy (mean over K and seeds)}."""
    by_key: dict[tuple[str, int], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        by_key[(r["variant"], r["seq_len"])][r["lr"]][r["seed"]] = _mean_acc(r["val_acc"])
    chosen = {}
    for key, per_lr in by_key.items():
        seeds = set().union(*(set(s) for s in per_lr.values()))
        full = {lr: s for lr, s in per_lr.items() if set(s) == seeds} or per_lr
        chosen[key] = max(sorted(full), key=lambda lr: statistics.mean(full[lr].values()))
    return chosen


def best_runs(runs: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """{(variant, T): the runs (one per seed) at the chosen lr}."""
    chosen = select_lr(runs)
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in runs:
        if chosen[(r["variant"], r["seq_len"])] == r["lr"]:
            out[(r["variant"], r["seq_len"])].append(r)
    return dict(out)


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max)."""
    return statistics.mean(values), min(values), max(values)


def table(best: dict[tuple[str, int], list[dict]]) -> str:
    """Markdown table of the chosen runs: test accuracy per K as mean [min, max] over seeds."""
    ks = sorted({int(k) for rs in best.values() for r in rs for k in r["test_acc"]})
    lines = ["| variant | E | top-k | shared | T | state / layer (active) | params | lr | seeds | "
             + " | ".join(f"acc K={k}" for k in ks) + " |",
             "|" + "---|" * (9 + len(ks))]
    for (name, seq_len), rs in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])):
        r0 = rs[0]
        cells = []
        for k in ks:
            values = [r["test_acc"][str(k)] for r in rs if str(k) in r["test_acc"]]
            mean, low, high = spread(values) if values else (float("nan"),) * 3
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {name} | {r0['num_memories']} | {r0['topk']} | {'yes' if r0['shared_memory'] else 'no'} | "
                     f"{seq_len} | {r0['state_per_layer']:,} ({r0['active_state_per_layer']:,}) | {r0['params']:,} | "
                     f"{r0['lr']:g} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("tools/plot_mqar.py needs matplotlib (not a project dependency): pip install matplotlib")
    return plt


def plot_acc_vs_k(best: dict[tuple[str, int], list[dict]], title: str, png: Path) -> None:
    plt = _pyplot()
    seq_lens = sorted({t for _, t in best})
    rows = max(sum(t == seq_len for _, t in best) for seq_len in seq_lens)
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5.6 * len(seq_lens), 4 + 0.2 * rows), sharey=True,
                             squeeze=False)
    names = sorted({name for name, _ in best})
    colors = {name: plt.get_cmap("tab10" if len(names) <= 10 else "tab20")(i) for i, name in enumerate(names)}
    for ax, seq_len in zip(axes[0], seq_lens):
        for (name, t), rs in sorted(best.items()):
            if t != seq_len:
                continue
            ks = sorted({int(k) for r in rs for k in r["test_acc"]})
            stats = [spread([r["test_acc"][str(k)] for r in rs]) for k in ks]
            mean = [s[0] for s in stats]
            err = [[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]]
            r0 = rs[0]
            label = (f"{name} (state {r0['state_per_layer']:,}, active {r0['active_state_per_layer']:,}; "
                     f"lr {r0['lr']:g}, {len(rs)} seeds)")
            ax.errorbar(ks, mean, yerr=err, marker="o", capsize=3, label=label, color=colors[name])
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"T = {seq_len}")
        ax.set_xlabel("key-value pairs K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    axes[0][0].set_ylabel("test accuracy (mean over seeds, bars: min-max)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_memories(best: dict[tuple[str, int], list[dict]], title: str, png: Path) -> bool:
    """Accuracy (mean over K) against E for the plain-width variants; False when no T has two memory counts."""
    points: dict[tuple[int, bool], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_, seq_len), rs in best.items():
        for r in rs:
            if r["expand_v"] == 1.0 and r["topk"] == max(1, r["num_memories"] // 2):
                points[(seq_len, r["shared_memory"])][r["num_memories"]].append(_mean_acc(r["test_acc"]))
    # A T with a single memory count (e.g. only `mom` ran there) has no curve to draw.
    counts = defaultdict(set)  # T -> memory counts that ran there
    for (seq_len, _), per_e in points.items():
        counts[seq_len] |= set(per_e)
    seq_lens = sorted(t for t, es in counts.items() if len(es) > 1)
    if not seq_lens:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(max(7.0, 5 * len(seq_lens)), 4.4), sharey=True, squeeze=False)
    for ax, seq_len in zip(axes[0], seq_lens):
        for shared in (True, False):
            per_e = points.get((seq_len, shared))
            if not per_e:
                continue
            es = sorted(per_e)
            stats = [spread(per_e[e]) for e in es]
            ax.errorbar(es, [s[0] for s in stats],
                        yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
                        marker="o", capsize=3, label="with shared memory" if shared else "without shared memory")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_title(f"T = {seq_len}, top-k = E/2 (top-1 for E = 1)")
        ax.set_xlabel("routed memories E")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy, mean over K (bars: seed min-max)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summaries", type=Path, nargs="+", help="JSON files written by tools/mqar_sweep.py")
    p.add_argument("--acc_png", type=Path, required=True, help="accuracy against K per variant")
    p.add_argument("--memories_png", type=Path, required=True, help="accuracy against the number of memories")
    args = p.parse_args(argv)
    summaries, runs = load_runs(args.summaries)
    if not runs:
        raise SystemExit(f"{' '.join(map(str, args.summaries))}: no completed run to plot")
    for png in (args.acc_png, args.memories_png):
        if not png.resolve().parent.is_dir():
            raise SystemExit(f"{png}: folder {png.resolve().parent} does not exist")
    _pyplot()
    s = summaries[0]["settings"]
    statuses = [r.get("status") for summary in summaries for r in summary["runs"]]
    devices = sorted({summary.get("device", "?") for summary in summaries})
    title = (f"MQAR, vocab {s['vocab_size']}, {s['steps']} steps x batch {s['batch_size']}, {', '.join(devices)}\n"
             f"{len(runs)} complete runs ({statuses.count('not_run')} not run, {statuses.count('failed')} failed)")
    best = best_runs(runs)
    print(table(best))
    plot_acc_vs_k(best, title, args.acc_png)
    print(f"wrote {args.acc_png}")
    if plot_memories(best, title, args.memories_png):
        print(f"wrote {args.memories_png}")
    else:
        print(f"no memory-count variant among the runs: {args.memories_png} not drawn")


if __name__ == "__main__":
    main()

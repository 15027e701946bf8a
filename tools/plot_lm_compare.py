"""Plots and a table of the language-model comparison from the summaries ``tools/lm_compare.py`` writes.

Runs are grouped by label (the variant, or ``--label``); runs of one label differ in their seed.

* ``STEM_loss.png``: validation loss against training tokens, one colour per label: the mean over seeds (markers)
  with the seeds' lowest-to-highest range shaded, and the training loss (thin, lighter) of a label with one run;
  with several labels, a lower panel of each label's validation loss minus the first label's at the same seed.
* ``STEM_length.png``: loss against position in the context (buckets of ``mom-lit evaluate length``), one line
  per label (mean over seeds), with the training context marked.
* On stdout, a Markdown table: per label, the final validation loss (mean and range over seeds) and its
  difference from the first label's at each shared seed, parameters, tokens and tokens/s.

Usage::

    python tools/plot_lm_compare.py runs/lm/*/summary.json --out docs/lm_compare

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool's figure helpers
from plot_training import add_footnote, new_figure  # noqa: E402


def _millions(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def group_by_label(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs of one label (a variant, or a variant with other settings), in the order first seen; each label's
    runs must differ in their seed only."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        runs = groups.setdefault(s["label"], [])
        if any(r["seed"] == s["seed"] for r in runs):
            raise SystemExit(f"two summaries of label {s['label']!r} have the same seed {s['seed']}: give one "
                             "of them its own --label")
        runs.append(s)
    return groups


def spread(series: list[dict[int, float]]) -> list[tuple[int, float, float, float]]:
    """(x, mean, lowest, highest) over the series at the x values that every series has."""
    shared = sorted(set.intersection(*(set(one) for one in series))) if series else []
    return [(x, sum(one[x] for one in series) / len(series), min(one[x] for one in series),
             max(one[x] for one in series)) for x in shared]


def mean_curve(runs: list[dict[str, Any]], key: str = "val_loss") -> list[tuple[int, float, float, float]]:
    """(tokens, mean, lowest, highest) over the runs at the token counts that every run reached."""
    return spread([dict(map(tuple, r[key])) for r in runs])


def _describe(label: str, runs: list[dict[str, Any]]) -> str:
    p = runs[0]["parameters"]
    rates = sorted(r["tokens_per_sec"] for r in runs if r.get("tokens_per_sec"))
    rate = f"{rates[len(rates) // 2] / 1e3:.0f}K tokens/s" if rates else "tokens/s unknown"
    seeds = ",".join(str(r["seed"]) for r in runs)
    return (f"{label}: {_millions(p['total'])} parameters ({_millions(p['active_per_token'])} active), "
            f"{rate}, seed(s) {seeds}")


def _note(groups: dict[str, list[dict[str, Any]]]) -> str:
    summaries = [s for runs in groups.values() for s in runs]
    devices = sorted({s["device"] for s in summaries})
    commits = sorted({(s["git"]["commit"] or "?")[:8] for s in summaries})
    return ("; ".join(_describe(label, runs) for label, runs in groups.items())
            + f". Context {summaries[0]['seq_len']}, {', '.join(devices)}, commit {', '.join(commits)}.")


def table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: per label, the final validation loss (mean over seeds, lowest-highest) and its difference from
    the first label's at the same seeds."""
    first_label, first = next(iter(groups.items()))
    lines = ["| run | parameters (active) | seeds | tokens | final val loss: mean (lowest-highest) "
             f"| minus {first_label}'s, per seed | tokens/s |", "|---|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        finals = [r["final_val_loss"] for r in runs]
        p = runs[0]["parameters"]
        spread = f" ({min(finals):.4f}-{max(finals):.4f})" if len(finals) > 1 else ""
        base = {r["seed"]: r["final_val_loss"] for r in first}
        diffs = [] if label == first_label else [f"{r['final_val_loss'] - base[r['seed']]:+.4f}" for r in runs
                                                  if r["seed"] in base]
        rates = sorted(r["tokens_per_sec"] for r in runs if r.get("tokens_per_sec"))
        rate = f"{rates[len(rates) // 2]:,.0f}" if rates else "-"
        lines.append(f"| {label} | {_millions(p['total'])} ({_millions(p['active_per_token'])}) "
                     f"| {','.join(str(r['seed']) for r in runs)} | {_millions(runs[0]['tokens'])} "
                     f"| {sum(finals) / len(finals):.4f}{spread} | {' '.join(diffs) or '-'} | {rate} |")
    return "\n".join(lines)


def paired_difference(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[tuple[int, float, float, float]]:
    """(tokens, mean, lowest, highest) over the seeds both labels ran of the validation loss minus the base
    label's at the same seed: the data order is the seed's, so the pairs differ in the model only."""
    by_seed = {r["seed"]: dict(map(tuple, r["val_loss"])) for r in base}
    return spread([{t: v - by_seed[r["seed"]][t] for t, v in r["val_loss"] if t in by_seed[r["seed"]]}
                   for r in runs if r["seed"] in by_seed])


def plot_loss(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation loss against tokens per label: the mean over seeds (markers) with the seeds' range shaded; the
    training loss (thin, lighter) where a label has a single run. With several labels, a lower panel shows each
    label's difference from the first one, seed by seed (mean and range)."""
    labels = list(groups)
    fig = new_figure(figsize=(7.5, 6.4 if len(labels) > 1 else 4.6), dpi=120)
    if len(labels) > 1:
        ax, dax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        ax, dax = fig.add_subplot(), None
    for i, (label, runs) in enumerate(groups.items()):
        colour = f"C{i}"
        if len(runs) == 1 and runs[0]["train_loss"]:
            x, y = zip(*runs[0]["train_loss"])
            ax.plot([v / 1e6 for v in x], y, color=colour, alpha=0.35, linewidth=0.8, label=f"{label} train")
        curve = mean_curve(runs)
        if curve:
            x, mean, low, high = zip(*curve)
            x = [v / 1e6 for v in x]
            name = f"{label} val" + (f", mean of {len(runs)} seeds" if len(runs) > 1 else "")
            ax.plot(x, mean, color=colour, marker="o", markersize=3, label=name)
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
        diff = paired_difference(runs, groups[labels[0]]) if dax is not None and i > 0 else []
        if diff:
            x, mean, low, high = zip(*diff)
            x = [v / 1e6 for v in x]
            dax.plot(x, mean, color=colour, marker="o", markersize=3, label=f"{label} - {labels[0]}")
            if any(lo != hi for lo, hi in zip(low, high)):  # several seeds
                dax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
    finals = [s["final_val_loss"] for runs in groups.values() for s in runs if s.get("final_val_loss") is not None]
    if finals:  # the early loss is far above the end: keep the end readable
        ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Language-model loss at matched training tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if dax is not None:
        dax.axhline(0.0, color="grey", linewidth=0.8)
        dax.set_ylabel("val loss difference\n(same seed; below 0: lower)", fontsize=8)
        dax.grid(True, alpha=0.3)
        dax.legend(fontsize=8)
    (dax if dax is not None else ax).set_xlabel("training tokens (millions)")
    add_footnote(fig, _note(groups))
    fig.savefig(path)


def plot_length(groups: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Loss per position bucket, one line per label (the mean over its seeds' length evaluations)."""
    measured = {label: [r for r in runs if r.get("length")] for label, runs in groups.items()}
    runs = [r for rs in measured.values() for r in rs]
    if not runs:
        return False
    fig = new_figure(figsize=(7.5, 4.6), dpi=120)
    ax = fig.add_subplot()
    for i, (label, rs) in enumerate(measured.items()):
        if not rs:
            continue
        curve = spread([{b["stop"]: b["loss"] for b in r["length"]["buckets"] if math.isfinite(b["loss"])}
                        for r in rs])
        name = label + (f", mean of {len(rs)} seeds" if len(rs) > 1 else "")
        ax.plot([c[0] for c in curve], [c[1] for c in curve], color=f"C{i}", marker="o", markersize=3, label=name)
    train_length = runs[0]["length"]["meta"].get("train_length")
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", label=f"training context {train_length}")
    ax.set_xscale("log", base=2)
    stops = sorted({r["stop"] for s in runs for r in s["length"]["buckets"]})
    ax.set_xticks(stops, [f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in stops], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("position in the context (upper edge of the bucket, tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss against position, past the training context", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    meta = runs[0]["length"]["meta"]
    add_footnote(fig, f"{meta['documents']} held-out documents of at least {meta.get('min_length', '?')} + 1 tokens "
                   f"from {meta['source']}, chunks of {meta['chunk_size']} on the recurrent cache; a bucket averages "
                   "the documents that reach it.")
    fig.savefig(path)
    return True


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="tools/plot_lm_compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", help="summary JSON files written by tools/lm_compare.py")
    parser.add_argument("--out", required=True, help="output path stem: writes STEM_loss.png and STEM_length.png")
    args = parser.parse_args(argv)
    summaries = []
    for name in args.summaries:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"summary {path} does not exist")
        summaries.append(json.loads(path.read_text()))
    groups = group_by_label(summaries)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(stem.name + "_loss.png")]
    plot_loss(groups, written[0])
    length = stem.with_name(stem.name + "_length.png")
    if plot_length(groups, length):
        written.append(length)
    print(table(groups))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()

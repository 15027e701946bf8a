"""Plots of the language-model comparison from the summaries ``tools/lm_compare.py`` writes.

* ``STEM_loss.png``: loss against training tokens, one colour per run: validation loss (markers, solid) and the
  training loss (thin, lighter).
* ``STEM_length.png``: loss against position in the context (buckets of ``mom-lit evaluate length``), one line per
  run that has a length evaluation, with the training context marked.

Usage::

    python tools/plot_lm_compare.py runs/lm/mom_s0/summary.json runs/lm/gdn_s0/summary.json --out docs/lm_compare

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


def _describe(s: dict[str, Any]) -> str:
    p = s["parameters"]
    rate = f"{s['tokens_per_sec'] / 1e3:.0f}K tokens/s" if s.get("tokens_per_sec") else "tokens/s unknown"
    return (f"{s['label']}: {_millions(p['total'])} parameters ({_millions(p['active_per_token'])} active), "
            f"{rate}")


def _note(summaries: list[dict[str, Any]]) -> str:
    devices = sorted({s["device"] for s in summaries})
    seeds = sorted({s["seed"] for s in summaries})
    commits = sorted({(s["git"]["commit"] or "?")[:8] for s in summaries})
    return ("; ".join(_describe(s) for s in summaries)
            + f". Context {summaries[0]['seq_len']}, seed(s) {seeds}, {', '.join(devices)}, "
            f"commit {', '.join(commits)}.")


def plot_loss(summaries: list[dict[str, Any]], path: Path) -> None:
    fig = new_figure(figsize=(7.5, 4.6), dpi=120)
    ax = fig.add_subplot()
    for i, s in enumerate(summaries):
        colour = f"C{i}"
        if s["train_loss"]:
            x, y = zip(*s["train_loss"])
            ax.plot([v / 1e6 for v in x], y, color=colour, alpha=0.35, linewidth=0.8, label=f"{s['label']} train")
        if s["val_loss"]:
            x, y = zip(*s["val_loss"])
            ax.plot([v / 1e6 for v in x], y, color=colour, marker="o", markersize=3, label=f"{s['label']} val")
    finals = [s["final_val_loss"] for s in summaries if s.get("final_val_loss") is not None]
    if finals:  # the early loss is far above the end: keep the end readable
        ax.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Language-model loss at matched training tokens", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    add_footnote(fig, _note(summaries))
    fig.savefig(path)


def plot_length(summaries: list[dict[str, Any]], path: Path) -> bool:
    runs = [s for s in summaries if s.get("length")]
    if not runs:
        return False
    fig = new_figure(figsize=(7.5, 4.6), dpi=120)
    ax = fig.add_subplot()
    for i, s in enumerate(summaries):
        if not s.get("length"):
            continue
        rows = [r for r in s["length"]["buckets"] if math.isfinite(r["loss"])]
        ax.plot([r["stop"] for r in rows], [r["loss"] for r in rows], color=f"C{i}", marker="o", markersize=3,
                label=s["label"])
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
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(stem.name + "_loss.png")]
    plot_loss(summaries, written[0])
    length = stem.with_name(stem.name + "_length.png")
    if plot_length(summaries, length):
        written.append(length)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()

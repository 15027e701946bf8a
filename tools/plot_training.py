"""Plots of a training run from its TensorBoard event files: the loss curve and the routing over training.

* ``STEM_loss.png``: ``train/lm_loss`` (language-model loss of each logged training step) and ``val/loss``
  (token-weighted validation loss) against the optimizer step, in nats per token.
* ``STEM_routing.png``: what ``RoutingStatsCallback`` logs, per layer: the share of routed slots each memory
  received (``routing/layer{l}/load_mem{e}``; 1/E is balanced) and two entropies, the mean per-token router
  entropy (``router_entropy``) and the entropy of the load shares (``load_entropy``; log E is balanced).

Usage::

    python tools/plot_training.py runs/quickstart/version_0 --out docs/quickstart

writes ``docs/quickstart_loss.png`` and ``docs/quickstart_routing.png`` (``--loss-png`` / ``--routing-png``
name them explicitly). Needs matplotlib (``pip install matplotlib``) and tensorboard (a dependency).
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

Series = list[tuple[int, float]]
_LOAD = re.compile(r"routing/layer(\d+)/load_mem(\d+)$")


def read_scalars(run_dir: str | Path) -> dict[str, Series]:
    """Every scalar tag of the event files under ``run_dir`` as (step, value) pairs sorted by step.

    Several event files (a resumed run) are merged; a step logged twice keeps its latest value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, {}).update({e.step: float(e.value) for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def routing_series(scalars: dict[str, Series]) -> tuple[dict[int, dict[int, Series]], int]:
    """{layer: {memory: load series}} and the number of memories E; empty without routing scalars."""
    layers: dict[int, dict[int, Series]] = {}
    for tag, series in scalars.items():
        match = _LOAD.match(tag)
        if match:
            layers.setdefault(int(match[1]), {})[int(match[2])] = series
    memories = max((len(m) for m in layers.values()), default=0)
    return dict(sorted(layers.items())), memories


def new_figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise SystemExit(f"the plots need matplotlib (pip install matplotlib): {error}")
    return Figure(**kwargs)


def add_footnote(fig, note: str) -> None:
    """``note`` in small grey lines under the axes, wrapped to the figure's width; leaves room for it."""
    lines = textwrap.wrap(note, width=int(fig.get_figwidth() * 19)) if note else []
    for i, line in enumerate(lines):
        fig.text(0.01, 0.01 + 0.03 * (len(lines) - 1 - i), line, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.01 + 0.03 * len(lines), 1, 1))


def plot_loss(scalars: dict[str, Series], path: Path, title: str, note: str) -> None:
    train = scalars.get("train/lm_loss") or scalars.get("train/loss")
    if not train:
        raise ValueError("the run has no train/lm_loss or train/loss scalars")
    fig = new_figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train (each logged step)", linewidth=1.2)
    val = scalars.get("val/loss")
    if val:
        ax.plot(*zip(*val), marker="o", linestyle="--", label="validation")
        for step, value in val:
            ax.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 8), ha="center",
                        fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    add_footnote(fig, note)
    fig.savefig(path)


def plot_routing(scalars: dict[str, Series], path: Path, title: str, note: str) -> None:
    layers, memories = routing_series(scalars)
    if not layers:
        raise ValueError("the run has no routing/layer*/load_mem* scalars (RoutingStatsCallback was not used)")
    n = len(layers)
    fig = new_figure(figsize=(3.0 * n, 5.6), dpi=120)
    axes = fig.subplots(2, n, sharex=True, squeeze=False)
    for col, (layer, loads) in enumerate(layers.items()):
        ax = axes[0][col]
        for memory, series in sorted(loads.items()):
            ax.plot(*zip(*series), label=f"memory {memory}", linewidth=1.2)
        ax.axhline(1 / memories, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_ylim(0, max(0.5, max(v for s in loads.values() for _, v in s) * 1.1))
        ax.grid(True, alpha=0.3)
        ax = axes[1][col]
        for name, style in (("router_entropy", "-"), ("load_entropy", "--")):
            series = scalars.get(f"routing/layer{layer}/{name}")
            if series:
                ax.plot(*zip(*series), linestyle=style, label=name.replace("_", " "))
        ax.axhline(math.log(memories), color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"share of routed slots (1/E = {1 / memories:.2f} dotted)", fontsize=8)
    axes[1][0].set_ylabel(f"entropy, nats (log E = {math.log(memories):.2f} dotted)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    axes[1][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    add_footnote(fig, note)
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="tools/plot_training.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's TensorBoard folder, e.g. runs/quickstart/version_0")
    parser.add_argument("--out", default=None, help="output stem: writes STEM_loss.png and STEM_routing.png")
    parser.add_argument("--loss-png", default=None, help="path of the loss plot (overrides --out)")
    parser.add_argument("--routing-png", default=None, help="path of the routing plot (overrides --out)")
    parser.add_argument("--title", default=None, help="run name in the titles (default: the folder's)")
    parser.add_argument("--note", default="", help="a line printed under the plots (how the run was made)")
    args = parser.parse_args(argv)
    if args.out is None and (args.loss_png is None or args.routing_png is None):
        parser.error("give --out, or both --loss-png and --routing-png")
    scalars = read_scalars(args.run_dir)
    name = args.title or Path(args.run_dir).resolve().parent.name
    written: dict[str, Path] = {}
    paths = {"loss": args.loss_png or f"{args.out}_loss.png", "routing": args.routing_png or f"{args.out}_routing.png"}
    for kind, plot in (("loss", plot_loss), ("routing", plot_routing)):
        path = Path(paths[kind])
        path.parent.mkdir(parents=True, exist_ok=True)
        heading = f"{name}: {'loss' if kind == 'loss' else 'routing load and entropy'} over training"
        try:
            plot(scalars, path, heading, args.note)
        except ValueError as error:
            print(f"skipped {kind} plot: {error}")
            continue
        written[kind] = path
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()

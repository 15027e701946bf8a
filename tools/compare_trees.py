"""Before/after table of two checkouts timed in turn by ``tools/gpu_check.sh OUT against`` (``BASE=<checkout>``).

    python tools/compare_trees.py OUT/against

The step leaves, for every round R and tree T (``base`` or ``this``): ``T_rR_profile.json`` (``bench_layer.py
--profile-json``: device time of the layer's forward + backward, summed over its kernels) and ``T_rR_model.md`` /
``T_rR_model_graphed.md`` (``bench_layer.py --out``: the 12-layer training step, eager and captured as a CUDA graph).
This prints one markdown row per measurement: the median over the rounds of each tree, the range, and this / base.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

_FILE = re.compile(r"^(?P<tree>base|this)_r(?P<round>\d+)_(?P<what>profile\.json|model\.md|model_graphed\.md)$")
_MS = re.compile(r"([0-9.]+) ms")
_PARAMS = re.compile(r" \([0-9.]+ M\)")


def collect(folder: Path) -> dict[str, dict[str, list[float]]]:
    """{measurement: {tree: [milliseconds per round]}} from the files of the step's folder."""
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.iterdir()):
        match = _FILE.match(path.name)
        if match is None:
            continue
        tree, what = match["tree"], match["what"]
        if what == "profile.json":
            for label, entry in json.loads(path.read_text()).items():
                table[f"{label}, device time"][tree].append(entry["device_ms"])
            continue
        graphed = "graphed" if "graphed" in what else "eager"
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 4 or cells[0] != "model":
                continue
            ms = _MS.match(cells[3])
            if ms:  # a failed candidate's cell holds its error instead
                name = _PARAMS.sub("", cells[1])
                table[f"model {name}, {cells[2]}, training step ({graphed})"][tree].append(float(ms[1]))
    return table


def markdown(table: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| measurement | base (median, range) | this (median, range) | this / base |", "|---|---|---|---|"]

    def cell(times: list[float]) -> str:
        if not times:
            return "-"
        return f"{statistics.median(times):.3f} ms ({min(times):.3f}-{max(times):.3f}, {len(times)} rounds)"

    for name, trees in table.items():
        base, this = trees.get("base", []), trees.get("this", [])
        ratio = "-"
        if base and this and statistics.median(base) > 0:
            ratio = f"{statistics.median(this) / statistics.median(base):.3f}"
        lines.append(f"| {name} | {cell(base)} | {cell(this)} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="the against step's folder (OUT/against)")
    args = p.parse_args()
    if not args.folder.is_dir():
        p.error(f"not a folder: {args.folder}")
    table = collect(args.folder)
    if not table:
        sys.exit(f"no base_rN_*/this_rN_* files in {args.folder}: did the against step run?")
    print(markdown(table))


if __name__ == "__main__":
    main()

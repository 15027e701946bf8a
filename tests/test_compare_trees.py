"""tools/compare_trees.py: the before/after table of gpu_check.sh's ``against`` step, from the files that
``bench_layer.py`` writes for each tree and round."""

from __future__ import annotations

import json
import subprocess
import sys

from tools_import import load_tool

compare_trees = load_tool("compare_trees")

MODEL_TABLE = """Device: NVIDIA H100, torch 2.11, bfloat16, activation memory fast,balanced

| section | candidate | shape | time (fwd+bwd / step / per token) | fwd only / throughput | peak memory |
|---|---|---|---|---|---|
| model | mom_lit MoM (triton, fast) (148.2 M) | 8x2048 | {fast} ms ({fast}-{fast}) | 160.0 K tok/s | 16.87 GiB |
| model | mom_lit MoM (triton, balanced) (148.2 M) | 8x2048 | RuntimeError: out of memory | | |
"""


def _write_round(folder, tree, round_, device_ms, fast_ms):
    label = "layer mom_lit MoM (triton, fast), 8x2048, fwd+bwd"
    (folder / f"{tree}_r{round_}_profile.json").write_text(
        json.dumps({label: {"wall_ms": 2 * device_ms, "device_ms": device_ms, "kernels": {}}}))
    (folder / f"{tree}_r{round_}_model_graphed.md").write_text(MODEL_TABLE.format(fast=fast_ms))


def test_medians_per_tree_and_the_ratio(tmp_path):
    _write_round(tmp_path, "base", 1, 6.0, 100.0)
    _write_round(tmp_path, "base", 2, 8.0, 100.0)
    _write_round(tmp_path, "this", 1, 6.6, 103.0)
    (tmp_path / "unrelated.md").write_text("| model | x | 1x1 | 1.0 ms | | |\n")
    table = compare_trees.collect(tmp_path)
    profile = "layer mom_lit MoM (triton, fast), 8x2048, fwd+bwd, device time"
    graphed = "model mom_lit MoM (triton, fast), 8x2048, training step (graphed)"
    assert table[profile] == {"base": [6.0, 8.0], "this": [6.6]}
    assert table[graphed] == {"base": [100.0, 100.0], "this": [103.0]}
    assert not any("balanced" in name for name in table)  # a failed candidate's cell is no time
    rows = {line.split(" | ")[0].lstrip("| "): line for line in compare_trees.markdown(table).splitlines()}
    assert rows[profile].endswith("| 0.943 |")  # 6.6 / median(6.0, 8.0)
    assert rows[graphed].endswith("| 1.030 |")


def test_a_folder_without_runs_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(compare_trees.__file__), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "did the against step run" in proc.stderr
    proc = subprocess.run([sys.executable, str(compare_trees.__file__), str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a folder" in proc.stderr

"""Smoke runs of the GPU benchmark script on CPU (tiny shapes): its options keep working without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("extra", [pytest.param([], id="bf16-weights"), pytest.param(["--mixed"], id="mixed")])
def test_bench_layer_tiny_cpu_run(extra, tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_layer.py"), "--device", "cpu", "--tiny", "--sections", "layer",
           "--skip", "fla,SDPA,GDN", "--rep-ms", "20", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert ("fp32 weights, autocast bfloat16" in table) == bool(extra)
    rows = [line for line in table.splitlines() if line.startswith("| layer | mom_lit MoM")]
    assert len(rows) == 2, table  # both tiny shapes
    for row in rows:
        assert " ms | " in row and "error" not in row, row

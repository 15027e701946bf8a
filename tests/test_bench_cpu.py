"""The CPU benchmark's quickstart comparison: its batch, its table cells and its refusals (no timing here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from tools_import import load_tool

ROOT = Path(__file__).parents[1]


def test_quickstart_batch_is_a_packed_batch_of_the_quickstart_shape():
    bench_cpu = load_tool("bench_cpu")
    ids, targets, cu_seqlens = bench_cpu.quickstart_batch()
    batch, seq_len = bench_cpu.QUICKSTART_BATCH
    assert ids.shape == targets.shape == (1, batch * seq_len)
    assert torch.equal(ids[0, 1:], targets[0, :-1])  # targets are the next tokens
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == batch * seq_len
    assert (cu_seqlens.diff() > 0).all()
    row_starts = set(range(0, batch * seq_len, seq_len))
    assert row_starts < set(cu_seqlens.tolist())  # every row starts a segment, some documents start inside rows
    assert int(ids.max()) < bench_cpu.QUICKSTART_MODEL["vocab_size"]


def test_spread_gives_the_median_and_the_range():
    bench_cpu = load_tool("bench_cpu")
    assert bench_cpu.spread([3.0, 1.0, 2.0], ".1f") == "2.0 (1.0-3.0)"
    assert bench_cpu.spread([1.234], ".2f") == "1.23"


def test_vs_tree_without_a_package_is_refused(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_cpu.py"), "--quickstart-steps", "--vs-tree", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert f"--vs-tree {tmp_path}: no mom_lit package there" in proc.stderr

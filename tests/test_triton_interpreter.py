"""On CPU, the Triton kernel tests run under ``TRITON_INTERPRET=1`` in a fresh process.

The interpreter has to be active before Triton's language module is first used, which other tests of the suite
(torch.compile, inductor) do; a separate process keeps the two apart. On a GPU, ``test_triton_scan.py``,
``test_triton_decode.py``, ``test_slots.py``, ``test_mix.py`` and ``test_layer_fast_paths.py`` run the kernels
natively and this wrapper has nothing to add.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: there are no kernels to interpret")


# Two interpreted processes side by side, one thread each, so that a 2-core machine runs both halves at once;
# the layer's checkpointed first forwards join the kernel files to even out the two halves' times.
_CHECKPOINTED = "test_layer_fast_paths.py::test_first_forward_inside_an_activation_checkpoint"
INTERPRETED_SHARDS = (("test_triton_scan.py", "test_triton_decode.py", "test_slots.py", "test_mix.py", _CHECKPOINTED),
                      ("test_layer_fast_paths.py", f"--deselect=tests/{_CHECKPOINTED}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel test files run natively")
def test_triton_kernels_under_the_interpreter():
    """The kernel tests (scan, decoding step, slot and mix stages) and the layer's fast paths, interpreted."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *(arg if arg.startswith("-") else str(Path(__file__).with_name(arg)) for arg in shard)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1]) for shard in INTERPRETED_SHARDS]
    for shard, proc in zip(INTERPRETED_SHARDS, procs):
        stdout, stderr = proc.communicate()
        report = f"{' '.join(shard)}:\n" + stdout[-6000:] + stderr[-2000:]
        assert proc.returncode == 0, report
        assert " passed" in stdout and " failed" not in stdout, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the stage kernels run natively in their own tests")
def test_stage_launch_settings_do_not_change_results(tmp_path):
    """tools/bench_stages.py under the interpreter: every launch setting it tries computes what the defaults
    compute (fp32, tiny shapes), so the sweep can only choose between equal results."""
    root = Path(__file__).parents[1]
    out = tmp_path / "stages.md"
    proc = subprocess.run([sys.executable, str(root / "tools" / "bench_stages.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| conv")
            or line.startswith("| mix")]
    swept = [row for row in rows if "library defaults" not in row[1]]
    assert len(swept) >= 10, rows
    for group, setting, ms, difference in swept:
        assert "error" not in ms, (group, setting, ms)
        assert float(difference) < 1e-5, (group, setting, difference)

"""What works without the optional packages: triton (CUDA kernels) is declared nowhere, since a CPU-only torch does
not bring it, and lm_eval is the ``eval`` extra only.

The checks run in a fresh process where ``sys.modules["triton"] = None``: ``import triton`` then fails, and
``importlib.util.find_spec("triton")`` answers None, exactly as on a machine where it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # not installed, as far as imports and find_spec can tell

    import importlib
    for name in ("mom_lit", "mom_lit.training", "mom_lit.training.cli", "mom_lit.generate", "mom_lit.data",
                 "mom_lit.interop", "mom_lit.eval", "mom_lit.callbacks", "mom_lit.ops.scan.dispatch",
                 "mom_lit.__main__", "mom_lit.data.prepare_cli", "mom_lit.interop.convert_cli",
                 "mom_lit.eval.length_cli", "mom_lit.eval.__main__"):
        importlib.import_module(name)

    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from mom_lit import MoMConfig
    from mom_lit.training import MoMLightningModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = MoMConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, head_dim=8, num_memories=3,
                       topk=2, chunk_size=8, backend="eager")
    module = MoMLightningModule(config, warmup_steps=1)
    ids = torch.randint(0, 32, (4, 2, 12))
    batches = [{"input_ids": x, "labels": x.roll(-1, 1)} for x in ids]
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    out = module.model.eval().generate(ids[0][:, :5], max_new_tokens=3, temperature=0)
    assert out.shape == (2, 8)
    assert sys.modules["triton"] is None  # nothing got hold of a real triton
    print("trained and generated without triton")
""")


@pytest.mark.slow
def test_import_train_and_generate_on_cpu_without_triton():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained and generated without triton" in proc.stdout


def test_lm_eval_is_an_extra_of_its_own():
    """``[dev]`` does not pull lm_eval (hundreds of MB for one test module, which skips without it)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("lm_eval") for dep in extras["dev"]), extras["dev"]
    assert any(dep.startswith("lm_eval") for dep in extras["eval"]), extras["eval"]

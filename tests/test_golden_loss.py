"""Golden-loss regression: a deterministic tiny training run must reproduce committed per-step losses.

Each variant trains a tiny model for ``STEPS`` optimizer steps through ``Trainer.fit`` of
``MoMLightningModule`` (its AdamW groups, warm-up + cosine schedule, gradient clipping and non-finite check) on
fixed batches, half of them packed documents with ``cu_seqlens``, and compares every step's ``loss``, ``lm_loss``
and ``aux_loss`` with ``tests/data/golden_losses.json``. The run covers the whole MoM layer: routing, the
per-memory slots and short convolution, the varlen scan over (row, document, memory) segments, the weighted mix
with the shared memory, the gated norm, and the load-balancing and router z-loss terms.

The initial weights are the project's own initialisation from a fixed seed, committed in
``tests/data/golden_init.safetensors`` and loaded by parameter name: a change of the order in which parameters
draw their random numbers (a module moved, a parameter created earlier) leaves the test valid, while a change of
the checkpoint layout makes the strict load fail by name.

The scan runs on the eager chunked reference (``backend="eager"``): the CPU default, ``auto``, is the same
reference under ``torch.compile``, whose first compilation takes about half a minute, too long for every run of
the suite; ``test_compiled_scan_follows_golden_losses`` (marked ``slow``) covers it against the same file.

Tolerances: the float64 variant (``mom_fp64``) is compared at ``FP64_TOL``, far below any change of the math,
yet above the rounding of a reordered sum; the float32 variants at ``FP32_TOL``, twenty times the largest
difference a reordered computation makes over the run (the compiled scan, and the float64 run, differ from the
eager float32 run by at most 5e-7) and far below any change of the math.

Regenerate both files (only after a deliberate change of the model's math, saying why in the commit):

    OMP_NUM_THREADS=1 python tests/test_golden_loss.py --regenerate
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from mom_lit import MoMConfig
from mom_lit.training import MoMLightningModule

GOLDEN = Path(__file__).parent / "data" / "golden_losses.json"
GOLDEN_INIT = Path(__file__).parent / "data" / "golden_init.safetensors"
STEPS = 24
SEED = 1234
BATCH, SEQ_LEN = 2, 23  # odd length: partial chunks of the chunk_size 8 scan
FP32_TOL = 1e-5  # absolute, on losses of about 4
FP64_TOL = 1e-9

BASE = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, expand_v=1.0, mlp_ratio=2.0,
            conv_size=4, chunk_size=8, backend="eager", aux_loss_coef=0.01)
VARIANTS: dict[str, dict] = {
    # E=4 routed memories, top-2, a shared memory, global load balance and a router z-loss.
    "mom": dict(BASE, num_memories=4, topk=2, shared_memory=True, router_z_loss_coef=1e-3),
    # The same in float64: a tight tolerance that still admits a reordered sum.
    "mom_fp64": dict(BASE, num_memories=4, topk=2, shared_memory=True, router_z_loss_coef=1e-3),
    # One memory, no router: the single-memory Gated DeltaNet layer.
    "gdn": dict(BASE, num_memories=1, topk=1, shared_memory=False),
}
PRECISION = {"mom": "32-true", "mom_fp64": "64-true", "gdn": "32-true"}
INIT_OF = {"mom": "mom", "mom_fp64": "mom", "gdn": "gdn"}  # the float64 run starts from the float32 weights
MODULE_ARGS = dict(lr=3e-3, weight_decay=0.1, warmup_steps=4, min_lr_ratio=0.1)


def golden_batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` batches of shifted targets; odd batches are packed documents (``cu_seqlens`` over B*T tokens).

    Tokens follow a noisy arithmetic progression per row, so the loss has something to learn.
    """
    g = torch.Generator().manual_seed(SEED)
    batches = []
    for step in range(STEPS):
        start = torch.randint(0, vocab_size, (BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (BATCH, 1), generator=g)
        noise = (torch.rand(BATCH, SEQ_LEN + 1, generator=g) < 0.2) * torch.randint(
            0, vocab_size, (BATCH, SEQ_LEN + 1), generator=g)
        tokens = (start + stride * torch.arange(SEQ_LEN + 1) + noise) % vocab_size  # (B, T+1)
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if step % 2:
            # Documents of lengths 7, 16, 9, 14 over the flattened (1, B*T) batch; the last token of each
            # document predicts nothing.
            cu = torch.tensor([0, 7, 23, 32, 46], dtype=torch.int32)
            labels = batch["labels"].reshape(-1).clone()
            labels[cu[1:].long() - 1] = -100
            batch["labels"] = labels.reshape(BATCH, SEQ_LEN)
            batch["cu_seqlens"] = cu
        batches.append(batch)
    return batches


class _RecordLosses(L.Callback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        logged = trainer.callback_metrics
        row = {"loss": float(outputs["loss"].detach()), "lm_loss": float(logged["train/lm_loss"])}
        if "train/aux_loss" in logged:
            row["aux_loss"] = float(logged["train/aux_loss"])
        self.rows.append(row)


def seeded_module(name: str, backend: str | None = None) -> MoMLightningModule:
    """The module of variant ``name``, initialised by the project's code from ``SEED``."""
    values = dict(VARIANTS[name])
    if backend is not None:
        values["backend"] = backend
    L.seed_everything(SEED, workers=False, verbose=False)
    return MoMLightningModule(MoMConfig(**values), **MODULE_ARGS)


def initial_weights(name: str) -> dict[str, torch.Tensor]:
    """The committed initial state dict of variant ``name`` (keys as in ``MoMForCausalLM.state_dict``)."""
    prefix = INIT_OF[name] + "."
    return {key[len(prefix):]: value for key, value in load_file(GOLDEN_INIT).items() if key.startswith(prefix)}


def run_variant(name: str, backend: str | None = None) -> list[dict[str, float]]:
    """Train variant ``name`` from its committed initial weights for ``STEPS`` steps on one CPU thread; per-step
    losses."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        module = seeded_module(name, backend)
        module.model.load_state_dict(initial_weights(name))  # strict: every parameter and buffer by name
        record = _RecordLosses()
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, precision=PRECISION[name],
                            deterministic=True, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[record])
        batches = golden_batches(VARIANTS[name]["vocab_size"])
        trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return record.rows


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text())


def assert_follows(name: str, rows: list[dict[str, float]], tol: float) -> None:
    golden = load_golden()["variants"][name]
    assert golden["config"] == VARIANTS[name], f"{name}: the test's config changed; regenerate {GOLDEN.name}"
    assert len(rows) == len(golden["steps"]) == STEPS
    for step, (got, want) in enumerate(zip(rows, golden["steps"])):
        assert got.keys() == want.keys(), f"{name} step {step}: logged {sorted(got)}, golden {sorted(want)}"
        for key, value in want.items():
            assert math.isfinite(got[key]), f"{name} step {step}: {key} is {got[key]}"
            assert abs(got[key] - value) <= tol, (
                f"{name} step {step}: {key} = {got[key]!r}, golden {value!r} (difference {got[key] - value:.3g}, "
                f"tolerance {tol:g})")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_follows_golden_losses(name):
    tol = FP64_TOL if PRECISION[name] == "64-true" else FP32_TOL
    assert_follows(name, run_variant(name), tol)


def test_golden_run_learns():
    """The committed run is a training run, not noise: the loss falls and the load stays near balance."""
    steps = load_golden()["variants"]["mom"]["steps"]
    first, last = steps[:4], steps[-4:]
    assert sum(s["lm_loss"] for s in last) < sum(s["lm_loss"] for s in first) - 0.2
    assert all(0.9 < s["aux_loss"] < 2.0 for s in steps)


@pytest.mark.slow
def test_compiled_scan_follows_golden_losses():
    """The CPU default (``backend="auto"`` is the compiled reference) follows the eager run's losses."""
    assert_follows("mom", run_variant("mom", backend="auto"), FP32_TOL)


def regenerate() -> None:
    assert all(VARIANTS[name] == VARIANTS[INIT_OF[name]] for name in VARIANTS), "variants sharing weights differ"
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    weights = {}
    for base in sorted(set(INIT_OF.values())):
        state = seeded_module(base).model.state_dict()
        # Copies: a tied embedding and LM head share storage, which safetensors refuses to write.
        weights.update({f"{base}.{key}": value.detach().clone().contiguous() for key, value in state.items()})
    save_file(weights, GOLDEN_INIT)
    variants = {name: {"config": VARIANTS[name], "precision": PRECISION[name], "steps": run_variant(name)}
                for name in VARIANTS}
    payload = {"steps": STEPS, "seed": SEED, "module": MODULE_ARGS, "torch": torch.__version__,
               "variants": variants}
    GOLDEN.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {GOLDEN_INIT} and {GOLDEN} ({', '.join(variants)})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: {sys.argv[0]} --regenerate   (rewrites {GOLDEN_INIT.name} and {GOLDEN.name})")
    regenerate()

"""Loading a checkpoint never runs code: a planted pickle is refused by every entry point; the project's own
Lightning checkpoints load under the allowlist."""

from __future__ import annotations

import io
import pickletools
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import BATCH_SIZE, SEQ_LEN
from mom_lit.callbacks import RoutingStatsCallback
from mom_lit.data import TextDataModule
from mom_lit.data.mqar import MQARDataModule
from mom_lit.generate import main as generate_main
from mom_lit.interop import export_lightning_checkpoint, load_checkpoint, load_lightning_checkpoint
from mom_lit.safe_load import SAFE_TYPES, UnsafeCheckpointError, load_checkpoint_file
from mom_lit.training import MoMLightningModule
from mom_lit.training.cli import cli_main
from mom_lit.training.faults import AtomicCheckpointIO, PreemptionCheckpoint, verify_checkpoint_file
from test_training import TINY_QUICKSTART, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from convert import main as convert_main  # noqa: E402


class WritesMarker:
    """Unpickled freely, it calls ``open(marker, "w")``: the file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    """(a Lightning-looking checkpoint whose hyper-parameters hold a :class:`WritesMarker`, its marker file)."""
    marker = tmp_path / "marker"
    model = MoMLightningModule(tiny_config(vocab_size=320), warmup_steps=1)
    path = tmp_path / "planted.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 1,
                "hyper_parameters": {**model.hparams, "note": WritesMarker(marker)}}, path)
    return path, marker


def test_planted_pickle_is_refused_by_every_entry_point(tmp_path, planted):
    path, marker = planted
    refused = f"refusing to load checkpoint {path}: .*could run code .*Unsupported global: GLOBAL io.open"
    for load in (load_checkpoint, load_lightning_checkpoint, load_checkpoint_file, verify_checkpoint_file,
                 AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match=refused):
            load(path)
    with pytest.raises(UnsafeCheckpointError, match=refused):
        export_lightning_checkpoint(path, tmp_path / "exported")

    # The tools: an error naming the file, a non-zero status, nothing written.
    err = io.StringIO()
    assert generate_main(["--checkpoint", str(path), "--prompt", "a", "--max_new_tokens", "1"], out=io.StringIO(),
                         err=err) == 2
    assert f"refusing to load checkpoint {path}" in err.getvalue()
    assert convert_main([str(path), str(tmp_path / "converted")]) == 2
    assert not (tmp_path / "exported").exists() and not (tmp_path / "converted").exists()
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from mom_lit.eval.lm_eval_adapter import MoMEvalLM

    with pytest.raises(UnsafeCheckpointError, match=refused):
        MoMEvalLM(checkpoint=str(path), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["given", "last"])
def test_planted_pickle_is_refused_on_resume_before_anything_is_written(tmp_path, planted, monkeypatch, how):
    monkeypatch.setattr(sys, "argv", ["mom_lit"])
    path, marker = planted
    runs = tmp_path / "runs"
    if how == "last":
        last = runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        path = path.rename(last)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load checkpoint {path}"):
        cli_main(["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={runs}",
                  "--ckpt_path", "last" if how == "last" else str(path)])
    assert sorted(tmp_path.rglob("*")) == before
    assert not marker.exists()


def pickled_globals(path: Path) -> set[str]:
    """``module name`` of every global a ``torch.save`` file's pickle refers to, found without unpickling."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    ops = list(pickletools.genops(data))
    found = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":  # module and name pushed by the two ops before it
            found.add(f"{ops[i - 2][1]} {ops[i - 1][1]}")
    return found


@pytest.mark.parametrize("data", ["text", "mqar"])
def test_project_lightning_checkpoints_load_under_the_allowlist(tmp_path, four_batch_epochs, data, one_thread):
    """A checkpoint with optimizer and loop states, hyper-parameters, the data module's state (a ``pathlib`` data
    folder, the loader position of a worker process) and callbacks' states holds only allowed types."""
    if data == "text":
        datamodule = TextDataModule(data_dir=four_batch_epochs, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, num_workers=1)
        vocab_size = 320
    else:
        datamodule = MQARDataModule(vocab_size=64, seq_len=32, train_num_kv_pairs=(2, 4), test_num_kv_pairs=(2,),
                                    num_train_examples=8, num_test_examples=4, batch_size=4)
        vocab_size = 64
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config(vocab_size=vocab_size), warmup_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", save_last=True)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2, limit_val_batches=1, precision="bf16-mixed", gradient_clip_val=1.0,
                        callbacks=[checkpoint, LearningRateMonitor(), RoutingStatsCallback(log_every_n_steps=1),
                                   PreemptionCheckpoint()])
    trainer.fit(module, datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    tensor_rebuild = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    allowed = tensor_rebuild | {f"{t.__module__} {t.__qualname__}" for t in SAFE_TYPES}
    found = pickled_globals(last)
    assert {g for g in found if not g.endswith("Storage")} <= allowed, found
    loaded = load_checkpoint_file(last)
    assert {"optimizer_states", "loops", "callbacks", "hyper_parameters", "datamodule_hyper_parameters"} <= set(loaded)
    if data == "text":
        assert loaded["datamodule_hyper_parameters"]["data_dir"] == four_batch_epochs
        assert "train_loader" in loaded["TextDataModule"]
    assert load_checkpoint(last).config.vocab_size == vocab_size

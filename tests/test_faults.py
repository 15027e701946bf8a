"""Fault tolerance: non-finite steps, atomic checkpoint files, corrupt checkpoints and preemption signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mom_lit.training import MoMLightningModule
from mom_lit.training.faults import AtomicCheckpointIO, NonFiniteStepError, PreemptionCheckpoint, verify_checkpoint_file
from test_training import TINY_QUICKSTART, RandomTokens, fit, load_checkpoint, run_cli, tiny_config

POISONED = "model.blocks.1.attn.router.weight"
POISON_STEP = 2


class PoisonRouter(L.Callback):
    """Fills one layer's router weight with NaN for the forward/backward of one step, then puts it back before the
    non-finite check (callbacks' ``on_before_optimizer_step`` run before the module's): only that step's loss and
    gradients are non-finite. Records the trainable state around that step."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self._saved: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == POISON_STEP:
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}
            weight = pl_module.get_parameter(POISONED)
            self._saved = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._saved is not None:
            with torch.no_grad():
                pl_module.get_parameter(POISONED).copy_(self._saved)
            self._saved = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == POISON_STEP + 1:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_nonfinite_step_is_skipped(tmp_path):
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config(), warmup_steps=1)
    poison = PoisonRouter()
    trainer = fit(module, RandomTokens(), tmp_path, max_steps=5, callbacks=[poison], limit_val_batches=0,
                  gradient_clip_val=1.0)
    assert trainer.global_step == 5
    assert module.skipped_steps == 1
    assert float(trainer.logged_metrics["train/skipped_steps"]) == 1.0
    # The skipped step left every parameter as it was; the other steps trained.
    assert poison.before.keys() == poison.after.keys()
    for name, value in poison.before.items():
        assert torch.equal(poison.after[name], value), name
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert torch.isfinite(trainer.logged_metrics["train/loss"])
    # AdamW took 4 steps: its per-parameter step counters never saw the skipped one.
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {4.0}


def test_nonfinite_step_stops_with_location(tmp_path):
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config(), warmup_steps=1, nonfinite="stop")
    with pytest.raises(NonFiniteStepError) as info:
        fit(module, RandomTokens(), tmp_path, max_steps=5, callbacks=[PoisonRouter()], limit_val_batches=0)
    message = str(info.value)
    assert f"global step {POISON_STEP}" in message
    assert "router logits non-finite in layer(s) [1]" in message
    assert "non-finite gradients in" in message and "non-finite parameters" not in message


def test_nonfinite_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite"):
        MoMLightningModule(tiny_config(), nonfinite="ignore")
    with pytest.raises(ValueError, match="signals"):
        PreemptionCheckpoint(signals=("SIGNOPE",))


# Atomic checkpoint files --------------------------------------------------------------------------------------
def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(5.0)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a partial write ...
        raise KeyboardInterrupt  # ... then the process dies

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    restored = io.load_checkpoint(path)
    assert restored["step"] == 1 and torch.equal(restored["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_corrupt_checkpoint_is_named(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "broken.ckpt"
    io.save_checkpoint({"w": torch.randn(64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {path}.*corrupt or truncated"):
        io.load_checkpoint(path)
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {path}.*corrupt or truncated"):
        verify_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    whole = tmp_path / "whole.ckpt"
    io.save_checkpoint({"w": torch.randn(64)}, whole)
    verify_checkpoint_file(whole)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mom_lit", "fit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_rejects_truncated_checkpoint_by_name(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    proc = _cli(tmp_path, *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                "--ckpt_path", str(path))
    assert proc.returncode != 0
    assert f"cannot read checkpoint {path}" in proc.stderr


# Preemption ---------------------------------------------------------------------------------------------------
class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process in the middle of step ``step``, as a scheduler preempting the job."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_saves_last_and_stops_in_process(tmp_path):
    torch.manual_seed(0)
    before = signal.getsignal(signal.SIGUSR1)
    module = MoMLightningModule(tiny_config(), warmup_steps=1)
    trainer = fit(module, RandomTokens(), tmp_path, max_steps=6, limit_val_batches=0, default_root_dir=tmp_path,
                  callbacks=[SignalAtStep(2, int(signal.SIGUSR1)), PreemptionCheckpoint()])
    assert trainer.global_step == 3  # the step during which the signal came was completed, then training stopped
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3
    for name, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    assert signal.getsignal(signal.SIGUSR1) is before  # the handler is only installed while training


class KillAtStep(L.Callback):
    """SIGKILLs this process between backward and optimizer step of step ``step``: nothing can be saved."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(L.Callback):
    """Appends ``global_step loss`` (exact float repr) to ``path`` after every training step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")


def read_losses(path: Path) -> list[tuple[int, float]]:
    return [(int(step), float(loss)) for step, loss in (line.split() for line in path.read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [int(signal.SIGTERM)])
def test_preempted_run_saves_and_resumes_exactly(tmp_path, signum):
    short = [*TINY_QUICKSTART, "--trainer.max_steps=4", "--trainer.val_check_interval=2"]  # last.ckpt at 2, 4
    whole = tmp_path / "whole"
    run_cli(tmp_path, *short, f"--trainer.logger.init_args.save_dir={whole}",
            "--trainer.callbacks+=test_faults.RecordLosses", f"--trainer.callbacks.path={tmp_path / 'whole.txt'}")
    expected_losses = read_losses(tmp_path / "whole.txt")
    assert [step for step, _ in expected_losses] == [1, 2, 3, 4]

    parts = tmp_path / "parts"
    run_cli(tmp_path, *short, f"--trainer.logger.init_args.save_dir={parts}",
            "--trainer.callbacks+=test_faults.SignalAtStep", "--trainer.callbacks.step=0",
            f"--trainer.callbacks.signum={signum}")
    last = parts / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    # Saved at the end of the step during which the signal came, then the run stopped (exit status 0).
    assert load_checkpoint(last)["global_step"] == 1
    assert sorted(p.name for p in last.parent.glob("last*.ckpt")) == ["last.ckpt"]
    run_cli(tmp_path, *short, f"--trainer.logger.init_args.save_dir={parts}", "--ckpt_path", "last")

    expected = load_checkpoint(whole / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == expected["global_step"] == 4
    for name, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name

    # Killed outright during step 4, after last.ckpt was written at step 2: the resumed run repeats steps 3 and 4
    # with exactly the losses of the uninterrupted run.
    killed = tmp_path / "killed"
    record = ["--trainer.callbacks+=test_faults.RecordLosses", f"--trainer.callbacks.path={tmp_path / 'killed.txt'}"]
    proc = _cli(tmp_path, *short, f"--trainer.logger.init_args.save_dir={killed}", *record,
                "--trainer.callbacks+=test_faults.KillAtStep", "--trainer.callbacks.step=3")
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 2
    run_cli(tmp_path, *short, f"--trainer.logger.init_args.save_dir={killed}", *record, "--ckpt_path", "last")
    assert read_losses(tmp_path / "killed.txt") == expected_losses[:3] + expected_losses[2:]

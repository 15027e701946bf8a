"""Fault tolerance: non-finite steps, atomic checkpoint files, corrupt checkpoints and preemption signals."""

from __future__ import annotations

import os
import posixpath
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mom_lit.training import MoMLightningModule
from mom_lit.training.faults import (
    AtomicCheckpointIO,
    NonFiniteStepError,
    PreemptionCheckpoint,
    preemption_exit_code,
    verify_checkpoint_file,
)
from test_training import TINY_QUICKSTART, RandomTokens, fit, load_checkpoint, tiny_config

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
    # The weight was put back before the check: the forward pass, run again, is finite.
    assert "the forward pass re-run with the current parameters is finite" in message


class PoisonMemory(L.Callback):
    """Fills the value projection of layer 0's memories with NaN from step ``POISON_STEP`` on: its router stays
    finite, its memories and output do not, and every later router sees non-finite input."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == POISON_STEP:
            with torch.no_grad():
                pl_module.get_parameter("model.blocks.0.attn.v_proj").fill_(float("nan"))


def test_nonfinite_stop_names_the_layer_whose_memory_went_bad_first(tmp_path):
    torch.manual_seed(0)
    module = MoMLightningModule(tiny_config(), warmup_steps=1, nonfinite="stop")
    with pytest.raises(NonFiniteStepError) as info:
        fit(module, RandomTokens(), tmp_path, max_steps=5, callbacks=[PoisonMemory()], limit_val_batches=0)
    message = str(info.value)
    assert f"global step {POISON_STEP}" in message
    assert "router logits non-finite in layer(s) [1]" in message  # downstream of the cause
    assert "first non-finite in the forward pass: layer 0 memory output" in message  # the cause
    assert "memory state non-finite in layer(s) [0, 1]" in message
    assert "non-finite parameters in 1 of 34 tensors, first: ['blocks.0.attn.v_proj']" in message


def test_nonfinite_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite"):
        MoMLightningModule(tiny_config(), nonfinite="ignore")
    with pytest.raises(ValueError, match="signals"):
        PreemptionCheckpoint(signals=("SIGNOPE",))
    with pytest.raises(ValueError, match="exit_code"):
        PreemptionCheckpoint(exit_code=256)


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
    # One flipped byte inside a tensor: torch.load alone reads it silently, the stored CRC-32 does not match.
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(whole.read_bytes())
    data[data.index(torch.load(whole)["w"].numpy().tobytes()) + 5] ^= 0x01
    flipped.write_bytes(bytes(data))
    assert not torch.equal(torch.load(flipped)["w"], torch.load(whole)["w"])
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {flipped}: the file is corrupt .CRC mismatch"):
        io.load_checkpoint(flipped)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode


def test_checkpoint_url_is_written_through_its_file_system(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.chdir(tmp_path)  # a path taken for a local one would appear here, under "memory:"
    fs = fsspec.filesystem("memory")
    url = f"memory://ckpts-{tmp_path.name}/run/last.ckpt"
    io = AtomicCheckpointIO()
    for step in (1, 2):  # the second save replaces the first
        io.save_checkpoint({"step": step, "w": torch.arange(4.0) * step}, url)
    assert list(tmp_path.iterdir()) == []
    assert [posixpath.basename(p) for p in fs.ls(f"/ckpts-{tmp_path.name}/run", detail=False)] == ["last.ckpt"]
    verify_checkpoint_file(url)
    restored = io.load_checkpoint(url)
    assert restored["step"] == 2 and torch.equal(restored["w"], torch.arange(4.0) * 2)

    with fs.open(f"/ckpts-{tmp_path.name}/run/last.ckpt", "rb") as f:
        data = f.read()
    with fs.open(f"/ckpts-{tmp_path.name}/run/broken.ckpt", "wb") as f:
        f.write(data[: len(data) // 2])
    broken = url.replace("last.ckpt", "broken.ckpt")
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {broken}.*corrupt or truncated"):
        io.load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        io.load_checkpoint(url.replace("last.ckpt", "absent.ckpt"))
    fs.rm(f"/ckpts-{tmp_path.name}", recursive=True)


@pytest.mark.slow
def test_cli_saves_to_and_evaluates_from_a_checkpoint_url(tmp_path, monkeypatch, capsys):
    import fsspec

    from mom_lit.training.cli import cli_main
    from test_training import TINY_QUICKSTART

    monkeypatch.setattr(sys, "argv", ["mom_lit"])
    bucket = f"ckpt-cli-{tmp_path.name}"
    override = tmp_path / "remote.yaml"
    override.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                        f"      init_args:\n        dirpath: memory://{bucket}/run\n        save_last: true\n")
    args = [*[a for a in TINY_QUICKSTART if a != "--trainer.callbacks.log_every_n_steps=1"], "--config", str(override),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    fs = fsspec.filesystem("memory")
    try:
        cli_main(["fit", *args, "--trainer.max_steps=3"])
        assert sorted(posixpath.basename(p) for p in fs.ls(f"/{bucket}/run", detail=False)) == \
            ["epoch=0-step=3.ckpt", "last.ckpt"]
        cli = cli_main(["validate", *args, "--ckpt_path", f"memory://{bucket}/run/last.ckpt"])
        assert "val/loss" in cli.trainer.callback_metrics
        with pytest.raises(SystemExit):
            cli_main(["validate", *args, "--ckpt_path", f"memory://{bucket}/run/absent.ckpt"])
        assert capsys.readouterr().err.splitlines()[-1] == \
            f"error: --ckpt_path memory://{bucket}/run/absent.ckpt: no such checkpoint file"
    finally:
        fs.rm(f"/{bucket}", recursive=True)


def test_file_url_checkpoint_is_the_local_file(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 7}, f"file://{tmp_path}/run/last.ckpt")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] == 7
    assert io.load_checkpoint(f"file://{tmp_path}/run/last.ckpt")["step"] == 7


def _env() -> dict[str, str]:
    # One thread per run: the uninterrupted run goes on beside the interrupted ones, and all of them use the
    # same setting, so that their losses can be compared exactly.
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mom_lit", "fit", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _start_cli(cwd: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mom_lit", "fit", *args], cwd=cwd, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def _run_ok(cwd: Path, *args: str) -> None:
    proc = _cli(cwd, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]


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
                  callbacks=[SignalAtStep(2, int(signal.SIGUSR1)), PreemptionCheckpoint(exit_code=99)])
    assert preemption_exit_code(trainer) == 99
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


class KillDuringCheckpointWrite(L.Callback):
    """SIGKILLs this process half-way through writing ``last.ckpt`` at global step ``step``: the first half of
    the new file is on disk (flushed and synced), the rest never comes."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        assert isinstance(io, AtomicCheckpointIO), type(io)  # installed by the command line
        original = io.save_checkpoint

        def save_checkpoint(checkpoint, path, storage_options=None):
            if Path(path).name == "last.ckpt" and checkpoint["global_step"] == self.step:
                real_save = torch.save

                def torn_save(obj, f, *args, **kwargs):
                    real_save(obj, f, *args, **kwargs)
                    f.flush()
                    f.truncate(f.tell() // 2)
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)

                torch.save = torn_save
            return original(checkpoint, path, storage_options)

        io.save_checkpoint = save_checkpoint


class RecordSteps(L.Callback):
    """Appends ``global_step epoch loss blocks`` to ``path`` after every training step: the exact float repr of
    the loss and the token ids of every row of the batch (its ``seq_len + 1`` tokens, rows separated by ``;``)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1)  # (B, T+1): each row's token block
        blocks = ";".join(",".join(map(str, row)) for row in rows.cpu().tolist())
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {float(outputs['loss'])!r} {blocks}\n")


class KillDuringValidation(L.Callback):
    """SIGKILLs this process inside the validation run that follows step ``step``, before its checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


Step = tuple[int, int, float, tuple[tuple[int, ...], ...]]


def read_steps(path: Path) -> list[Step]:
    """``(global_step, epoch, loss, token blocks)`` per line of a :class:`RecordSteps` file."""
    lines = (line.split() for line in path.read_text().splitlines())
    return [(int(step), int(epoch), float(loss), tuple(tuple(map(int, row.split(","))) for row in rows.split(";")))
            for step, epoch, loss, rows in lines]


@pytest.mark.slow
def test_interrupted_runs_resume_exactly_across_epochs(tmp_path, four_batch_epochs):
    """A run over epochs of 4 steps (last.ckpt every 2) is preempted (SIGTERM) in step 1, SIGKILLed half-way
    through writing last.ckpt at the end of epoch 0, SIGKILLed in the validation run after step 6 and SIGKILLed
    inside step 9; each time ``--ckpt_path last`` resumes it, three times across an epoch boundary. Against an
    uninterrupted run: every step's loss and every batch's token ids are the same, no sample is repeated or
    skipped in any epoch, and the final weights are equal."""
    steps, per_epoch = 10, 4
    short = [*TINY_QUICKSTART, f"--data.init_args.data_dir={four_batch_epochs}", f"--trainer.max_steps={steps}",
             "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",  # last.ckpt at 2, 4, 6, 8, 10
             "--trainer.callbacks+=test_faults.RecordSteps"]

    def record(name: str) -> list[str]:
        return [f"--trainer.callbacks.path={tmp_path / name}.txt"]

    whole_dir, parts = tmp_path / "whole", tmp_path / "parts"
    # The uninterrupted run goes on beside the interrupted ones.
    whole = _start_cli(tmp_path, tmp_path / "whole.log", *short, *record("whole"),
                       f"--trainer.logger.init_args.save_dir={whole_dir}")
    ckpt_dir = parts / "quickstart" / "version_0" / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    interrupted = [*short, f"--trainer.logger.init_args.save_dir={parts}"]

    # Preempted: saves last.ckpt at the end of the step during which SIGTERM came, then exits with the status
    # configured for a preempted run.
    proc = _cli(tmp_path, *interrupted, *record("a"),
                "--trainer.callbacks+=mom_lit.training.faults.PreemptionCheckpoint", "--trainer.callbacks.exit_code=99",
                "--trainer.callbacks+=test_faults.SignalAtStep",
                "--trainer.callbacks.step=0", f"--trainer.callbacks.signum={int(signal.SIGTERM)}")
    assert proc.returncode == 99, proc.stderr[-4000:]
    assert load_checkpoint(last)["global_step"] == 1
    # Killed while writing last.ckpt at the end of epoch 0: the one of step 2 stays whole, a torn temporary file
    # is left.
    proc = _cli(tmp_path, *interrupted, *record("b"), "--ckpt_path", "last",
                "--trainer.callbacks+=test_faults.KillDuringCheckpointWrite", "--trainer.callbacks.step=4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert len(list(ckpt_dir.glob(".last.ckpt.*.tmp"))) == 1
    assert load_checkpoint(last)["global_step"] == 2
    # Resumed mid-epoch 0 and through its end; killed while validating after step 6, before its checkpoint.
    proc = _cli(tmp_path, *interrupted, *record("c"), "--ckpt_path", "last",
                "--trainer.callbacks+=test_faults.KillDuringValidation", "--trainer.callbacks.step=6")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert load_checkpoint(last)["global_step"] == 4
    assert not list(ckpt_dir.glob(".last.ckpt.*.tmp"))
    # Resumed from the end of epoch 0; killed inside step 9, after the checkpoint at the end of epoch 1.
    proc = _cli(tmp_path, *interrupted, *record("d"), "--ckpt_path", "last",
                "--trainer.callbacks+=test_faults.KillAtStep", "--trainer.callbacks.step=8")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert load_checkpoint(last)["global_step"] == 8
    _run_ok(tmp_path, *interrupted, *record("e"), "--ckpt_path", "last")
    assert not (parts / "quickstart" / "version_1").exists()  # every resume wrote into the same run

    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-4000:]
    expected = read_steps(tmp_path / "whole.txt")
    assert [(step, epoch) for step, epoch, _, _ in expected] == [(s, (s - 1) // per_epoch) for s in range(1, steps + 1)]
    pieces = {name: read_steps(tmp_path / f"{name}.txt") for name in "abcde"}
    assert [[step for step, *_ in piece] for piece in pieces.values()] == \
        [[1], [2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [9, 10]]
    # Every step ran, lost or not, exactly as in the uninterrupted run (float losses compared exactly).
    by_step = {step: rest for step, *rest in expected}
    for piece in pieces.values():
        for step, *rest in piece:
            assert rest == by_step[step], step
    # What each piece kept (its steps up to the checkpoint the next one resumed from) is the uninterrupted run.
    kept = [s for s in pieces["a"] if s[0] <= 1] + [s for s in pieces["b"] if s[0] <= 2] \
        + [s for s in pieces["c"] if s[0] <= 4] + [s for s in pieces["d"] if s[0] <= 8] + pieces["e"]
    assert kept == expected
    for epoch in range(steps // per_epoch):  # a whole epoch: every block once
        blocks = [row for _, e, _, rows in expected if e == epoch for row in rows]
        assert len(blocks) == per_epoch * 4 and len(set(blocks)) == len(blocks)

    final, reference = load_checkpoint(last), load_checkpoint(whole_dir / "quickstart" / "version_0" / "checkpoints"
                                                              / "last.ckpt")
    assert final["global_step"] == reference["global_step"] == steps
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name


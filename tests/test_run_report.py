"""What a command-line run tells its user and leaves in its folder: the validation loss in the progress bar, the
summary at the end of ``fit``, one config record per command (the first never replaced), a ``validate`` of a
training run kept out of its event files, and no placeholder TensorBoard cards.

The commands run in this process (``cli_main``) on the tiny quickstart.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml

from mom_lit.training.cli import cli_main
from mom_lit.training.run_report import quiet_vendor_tips, run_summary
from test_training import TINY_QUICKSTART, event_tags


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """The command line comes from ``args`` only, not from pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["mom_lit"])


def run(subcommand: str, save_dir: Path, *extra: str):
    return cli_main([subcommand, *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={save_dir}", *extra])


@pytest.mark.slow
def test_fit_reports_and_later_commands_keep_the_runs_config_and_events(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "quickstart" / "version_0"
    cli = run("fit", runs, "--trainer.max_steps=3")
    assert "val/loss" in cli.trainer.progress_bar_metrics
    summary = capsys.readouterr().err.split("Run finished at step 3", 1)[1].splitlines()
    best, last = cli.trainer.checkpoint_callback.best_model_score, cli.trainer.callback_metrics["val/loss"]
    assert summary[1] == f"  val/loss: best {float(best):.4f}, last {float(last):.4f}"
    assert f"  last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in summary
    assert f"  logs and config: {run_dir}" in summary
    resume = next(line for line in summary if line.startswith("  resume: "))
    assert resume.endswith(f"--trainer.logger.init_args.save_dir={runs} --trainer.max_steps=3 --ckpt_path last")
    assert f"  TensorBoard: tensorboard --logdir {runs}" in summary

    tags = set(event_tags(run_dir)["scalars"])
    assert {"val/loss", "train/aux_loss", "routing/max_min_ratio_worst"} <= tags
    assert not {"hp_metric", "epoch"} & tags  # the placeholder cards of Lightning's TensorBoard logger
    original = (run_dir / "config.yaml").read_bytes()
    assert yaml.safe_load(original)["trainer"]["max_steps"] == 3

    # A resumed fit continues the run's events; its own config is recorded beside the original.
    run("fit", runs, "--trainer.max_steps=6", "--ckpt_path", "last")
    assert not (runs / "quickstart" / "version_1").exists()
    assert (run_dir / "config.yaml").read_bytes() == original
    [resumed] = run_dir.glob("config.resume.*.yaml")
    assert yaml.safe_load(resumed.read_text())["trainer"]["max_steps"] == 6

    # A validate of the run: config beside the others, event files in their own sub-folder.
    events = sorted(run_dir.glob("events.out.tfevents.*"))
    run("validate", runs, "--ckpt_path", "last")
    assert sorted(run_dir.glob("events.out.tfevents.*")) == events
    assert (run_dir / "config.yaml").read_bytes() == original
    [record] = run_dir.glob("config.validate.*.yaml")
    validate_dir = run_dir / record.name.removeprefix("config.").removesuffix(".yaml")  # the same time stamp
    assert "val/loss" in event_tags(validate_dir)["scalars"]


@pytest.mark.slow
def test_resume_that_would_never_validate_is_refused_before_writing(tmp_path, capsys):
    runs = tmp_path / "runs"
    global_count = ("--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=4")
    run("fit", runs, "--trainer.max_steps=4", *global_count)  # validates (and saves last.ckpt) at step 4
    config_files = sorted((runs / "quickstart" / "version_0").glob("config*.yaml"))
    with pytest.raises(SystemExit):  # steps 5 to 7 hold no multiple of 4
        run("fit", runs, "--trainer.max_steps=7", *global_count, "--ckpt_path", "last")
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("error: resumed at step 4, the run would reach trainer.max_steps=7 without validating "
                   "(trainer.val_check_interval=4 training batches, counted from the start of the run): lower "
                   "val_check_interval or raise max_steps")
    assert sorted((runs / "quickstart" / "version_0").glob("config*.yaml")) == config_files
    cli = run("fit", runs, "--trainer.max_steps=8", *global_count, "--ckpt_path", "last")  # validates at step 8
    assert cli.trainer.global_step == 8 and "val/loss" in cli.trainer.callback_metrics


def test_summary_before_any_validation_or_checkpoint(tmp_path):
    cli = cli_main([*TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"], run=False)
    lines = run_summary(cli.trainer, None).splitlines()
    assert lines[0] == "Run finished at step 0 (epoch 0)."
    assert lines[1] == "  val/loss: last n/a"
    assert not any("checkpoint" in line or "resume" in line for line in lines)


def test_vendor_tips_are_dropped_and_other_messages_kept(caplog):
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_vendor_tips()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing a product")
        rank_zero_info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]

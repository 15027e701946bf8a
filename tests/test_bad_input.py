"""Bad input to the command line: each fails with a clear message and a non-zero exit before anything is written.

The commands run in this process (``cli_main``): a parser error is the ``SystemExit`` the process would exit
with, any other error the exception it would die of.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mom_lit.data.packing import TokenBlockCollate
from mom_lit.data.prepare import prepare_dataset
from mom_lit.training.cli import cli_main, config_files
from mom_lit.training.preflight import check_val_check_interval, train_batches_bound
from mom_lit.training.faults import OutputDirError, creation_failure, unwritable_reason
from test_data import _word_level_tokenizer
from test_training import TINY_QUICKSTART


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """The command line comes from ``args`` only, not from pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["mom_lit"])


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", *extra]


def assert_parser_error(tmp_path: Path, capsys, *extra: str) -> str:
    """Runs the command, expects the parser to refuse it and returns its message; nothing was written."""
    with pytest.raises(SystemExit) as info:
        cli_main(fit_args(tmp_path, *extra))
    assert info.value.code not in (0, None)
    assert not (tmp_path / "runs").exists()
    return capsys.readouterr().err


def assert_fails_before_writing(tmp_path: Path, error: type[BaseException], match: str, *extra: str) -> None:
    with pytest.raises(error, match=match):
        cli_main(fit_args(tmp_path, *extra))
    assert not (tmp_path / "runs").exists()


def assert_one_line_error(tmp_path: Path, capsys, match: str, *extra: str) -> None:
    """The command is refused by a one-line parser error matching ``match``; nothing was written."""
    err = assert_parser_error(tmp_path, capsys, *extra)
    assert "Traceback" not in err
    assert re.search(match, err.splitlines()[-1]), err


# Configs ----------------------------------------------------------------------------------------------------------
def test_malformed_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\nmodel: {\n")
    err = assert_parser_error(tmp_path, capsys, "--config", str(bad))
    assert f"malformed YAML in config file {bad}" in err
    assert f'in "{bad}", line 2' in err  # the position inside it


@pytest.mark.parametrize("yaml_text,message", [
    pytest.param("trainer:\n  bogus_key: 1\n", "does not accept option 'trainer.bogus_key'", id="unknown-trainer-key"),
    pytest.param("model:\n  config:\n    num_layer: 2\n", "model.config.num_layer", id="unknown-model-key"),
    pytest.param("model:\n  config:\n    num_heads: two\n", 'Parser key "model.config.num_heads"', id="wrong-type"),
    pytest.param("trainer:\n  max_steps: 1.5\n", "trainer.max_steps", id="float-for-int"),
])
def test_bad_config_keys_and_types_name_the_key(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "override.yaml"
    config.write_text(yaml_text)
    assert message in assert_parser_error(tmp_path, capsys, "--config", str(config))


@pytest.mark.parametrize("override,message", [
    pytest.param("--model.config.topk=9", "MoMConfig.topk=9 exceeds num_memories=4", id="topk>E"),
    pytest.param("--model.config.initializer_range=-1", "MoMConfig.initializer_range must be a finite number > 0",
                 id="negative-std"),
])
def test_invalid_values_name_the_field(tmp_path, capsys, override, message):
    # Parsed fine, refused by the model's config when it is built, before the Trainer exists: one line.
    err = assert_parser_error(tmp_path, capsys, override)
    assert f"error: model.config: {message}" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_nan_from_a_config_file_is_refused_in_one_line(tmp_path, capsys):
    # YAML's .nan passes the parser's float type; the model's config refuses it.
    config = tmp_path / "override.yaml"
    config.write_text("model:\n  config:\n    norm_eps: .nan\n")
    err = assert_parser_error(tmp_path, capsys, "--config", str(config))
    assert err.splitlines()[-1] == ("error: model.config: MoMConfig.norm_eps must be a finite number > 0, "
                                    "got nan (float)")


def test_config_files_are_found_on_the_command_line():
    assert config_files(["fit", "-c", "a.yaml", "--config=b.yaml", "--config", "c.yaml", "--x=1"]) == \
        ["a.yaml", "b.yaml", "c.yaml"]


# Output folders ---------------------------------------------------------------------------------------------------
def test_unwritable_output_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the run's folder should go")
    with pytest.raises(OutputDirError, match=f"save_dir '{blocker / 'runs'}': {blocker} is a file, not a folder"):
        cli_main(["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={blocker / 'runs'}"])
    assert blocker.read_text().startswith("a file")


def test_output_folder_that_cannot_be_created_is_refused(tmp_path):
    """/proc passes os.access for root, yet no folder can be made in it: found by trying, nothing left behind."""
    target = Path("/proc") / "mom_lit_runs"
    refused = f"save_dir '{target}': no folder can be created in /proc .*creating {target}"
    with pytest.raises(OutputDirError, match=refused):
        cli_main(["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={target}"])
    # A creatable folder is found by creating a probe beside it, then removed.
    assert creation_failure(tmp_path / "new" / "deeper") is None
    assert list(tmp_path.iterdir()) == []


def test_unwritable_reason(tmp_path, monkeypatch):
    assert unwritable_reason(tmp_path / "new" / "deeper") is None  # creatable: nothing is created to find out
    assert not (tmp_path / "new").exists()
    # A read-only file system (or, for other users than root, a folder without write permission).
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert unwritable_reason(tmp_path / "runs") == f"{tmp_path} is not writable (creating {tmp_path / 'runs'})"
    assert unwritable_reason(tmp_path) == f"{tmp_path} is not writable"


# Checkpoints ------------------------------------------------------------------------------------------------------
def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.ckpt"
    assert f"--ckpt_path {missing}: no such checkpoint file" in assert_parser_error(tmp_path, capsys, "--ckpt_path",
                                                                                    str(missing))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_checkpoint_is_named_before_anything_runs(tmp_path, damage):
    path = tmp_path / f"{damage}.ckpt"
    torch.save({"state_dict": {"w": torch.randn(4096)}}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # inside the tensor: torch.load alone would read it silently
    path.write_bytes(bytes(data))
    assert_fails_before_writing(tmp_path, RuntimeError, f"cannot read checkpoint {path}: the file is corrupt",
                                "--ckpt_path", str(path))


def test_damaged_last_checkpoint_is_named_before_its_run_folder_is_written(tmp_path):
    """``--ckpt_path last`` finds a damaged last.ckpt: the run folder receives no config.yaml, no event file."""
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.randn(4096)}}, last)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {last}: the file is corrupt"):
        cli_main(fit_args(tmp_path, "--ckpt_path", "last"))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("value", [None, 320])
def test_vocab_size_in_a_config_file_equal_to_the_data_modules_is_accepted(tmp_path, value):
    config = tmp_path / "vocab.yaml"
    config.write_text("model:\n  config:\n    hidden_size: 32\n" + (f"    vocab_size: {value}\n" if value else ""))
    cli = cli_main([*fit_args(tmp_path, "--config", str(config))[1:]], run=False)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size == 320


@pytest.mark.parametrize("value", [999, 32000])  # 32000: the field's default, given explicitly
def test_vocab_size_in_a_config_file_that_conflicts_with_the_data_module_is_refused(tmp_path, capsys, value):
    config = tmp_path / "vocab.yaml"
    config.write_text(f"model:\n  config:\n    vocab_size: {value}\n")
    err = assert_parser_error(tmp_path, capsys, "--config", str(config))
    assert err.splitlines()[-1] == (f"error: model.config.vocab_size={value} conflicts with the data module's "
                                    "vocab_size=320 (the model's vocabulary comes from the tokenizer): remove "
                                    "model.config.vocab_size or set it to 320")
    assert not (tmp_path / "runs").exists()


# Data -------------------------------------------------------------------------------------------------------------
def test_tokenizer_missing_offline_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_one_line_error(tmp_path, capsys, "acme/absent-model", "--data.init_args.tokenizer=acme/absent-model")


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    """A byte-tokenised dataset of a few hundred tokens with train and val splits."""
    root = tmp_path_factory.mktemp("tiny")
    source = root / "docs.jsonl"
    source.write_text("".join(f'{{"text": "document number {i} of a tiny corpus"}}\n' for i in range(12)))
    prepare_dataset(source, root / "prepared", val_fraction=0.25, seed=0, verbose=False)
    return root / "prepared"


def test_dataset_of_another_tokenizer_is_refused(tmp_path, capsys, tiny_prepared):
    tokenizer = _word_level_tokenizer(tmp_path / "tok")
    assert_one_line_error(tmp_path, capsys, "prepared with tokenizer 'byte'",
                          f"--data.init_args.data_dir={tiny_prepared}", f"--data.init_args.tokenizer={tokenizer}")


def test_dataset_shorter_than_a_batch_is_refused(tmp_path, capsys, tiny_prepared):
    assert_one_line_error(tmp_path, capsys, "too small.*fewer than batch_size=64",
                          f"--data.init_args.data_dir={tiny_prepared}", "--data.init_args.batch_size=64")


def test_missing_data_folder_is_named(tmp_path, capsys):
    assert_one_line_error(tmp_path, capsys, f"error: data_dir {tmp_path / 'absent'} does not exist",
                          f"--data.init_args.data_dir={tmp_path / 'absent'}")


def test_prepared_ids_outside_the_vocabulary_are_refused_before_the_run_folder_exists(tmp_path, capsys, tiny_prepared):
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    chunk = next((data / "train").glob("chunk-*.bin"))
    raw = bytearray(chunk.read_bytes())
    raw[-4:-2] = np.array([400], dtype=np.uint16).tobytes()  # one id of the last token block: byte vocab is 320
    chunk.write_bytes(bytes(raw))
    assert_one_line_error(tmp_path, capsys, f"{chunk} holds token ids outside the vocabulary \\[0, 320\\).*max 400",
                          f"--data.init_args.data_dir={data}", "--data.init_args.batch_size=2")


def test_token_ids_outside_the_vocabulary_are_refused_by_the_collate():
    """Checked on the host before a batch reaches the model (the model checks CPU inputs itself)."""
    collate = TokenBlockCollate(eos_id=0, pack_documents=True, vocab_size=10)
    assert collate([np.arange(6, dtype=np.uint16), np.arange(4, 10, dtype=np.uint16)])["input_ids"].max() == 8
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\): min 0, max 12"):
        collate([np.arange(6, dtype=np.uint16), np.array([1, 2, 3, 12, 4, 5], dtype=np.uint16)])


def test_val_check_interval_longer_than_an_epoch_is_refused_in_one_line(tmp_path, capsys, tiny_prepared):
    # A few batches per epoch; Lightning would refuse it only after writing the run folder.
    assert_one_line_error(tmp_path, capsys,
                          r"trainer\.val_check_interval=50 exceeds the \d training batches of one epoch.*"
                          r"check_val_every_n_epoch=null",
                          f"--data.init_args.data_dir={tiny_prepared}", "--data.init_args.batch_size=2",
                          "--trainer.val_check_interval=50")


@pytest.mark.parametrize("override", ["--trainer.check_val_every_n_epoch=null", "--trainer.val_check_interval=2",
                                      "--trainer.limit_val_batches=0"])
def test_val_check_interval_within_an_epoch_or_across_epochs_is_accepted(tmp_path, tiny_prepared, override):
    cli = cli_main(fit_args(tmp_path, f"--data.init_args.data_dir={tiny_prepared}", "--data.init_args.batch_size=2",
                            "--trainer.val_check_interval=50", override)[1:], run=False)
    assert 2 <= train_batches_bound(cli.datamodule, world_size=1) < 50
    check_val_check_interval(cli.trainer, cli.datamodule)  # does not raise


# Options ----------------------------------------------------------------------------------------------------------
def test_abbreviated_options_are_refused(tmp_path, capsys):
    err = assert_parser_error(tmp_path, capsys, "--model.config.num_layer=3")
    assert "unrecognized arguments: --model.config.num_layer=3" in err


@pytest.mark.parametrize("where", ["command-line", "config-file"])
def test_optimizer_options_are_refused_with_the_modules_settings_named(tmp_path, capsys, where):
    if where == "command-line":
        extra = ("--optimizer", "Adam")
    else:
        config = tmp_path / "optimizer.yaml"
        config.write_text("optimizer:\n  class_path: torch.optim.Adam\n")
        extra = ("--config", str(config))
    err = assert_parser_error(tmp_path, capsys, *extra)
    assert "not an option here" in err.splitlines()[-1]
    assert "--model.lr" in err and "--model.weight_decay" in err

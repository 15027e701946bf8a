"""The ``mom-lit`` command's verbs and the shipped configs it finds by name (in-process; the installed command is
checked in ``test_install.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from mom_lit.__main__ import NOT_OFFERED, VERBS, main
from mom_lit.shipped_configs import (UnknownConfigError, resolve_config, resolve_config_args, shipped_config_dir,
                                     shipped_config_names)

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``mom-lit argv``."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)  # as the interpreter does on exit
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_verb_with_its_line_and_the_shipped_configs(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name, verb in VERBS.items():
        assert f"  {name}  " in out and verb.help in out
    assert "predict" not in out
    listed = out.split("shipped configs (--config NAME, or a path):")[1].split("`")[0]
    assert [name.strip() for name in " ".join(listed.split()).split(",")] == shipped_config_names()
    code, _, err = run(capsys)  # no verb: the same text, as a usage error
    assert code == 2 and "verbs:" in err


def test_predict_and_unknown_verbs_are_refused_in_one_line(capsys):
    code, _, err = run(capsys, "predict", "--config", "quickstart")
    assert code == 2 and err == f"mom-lit: error: predict is not offered: {NOT_OFFERED['predict']}\n"
    code, _, err = run(capsys, "fitt")
    assert code == 2 and err.startswith("mom-lit: error: 'fitt' is not a verb (did you mean fit?)")
    assert len(err.splitlines()) == 1


def test_version_names_the_imported_package(capsys):
    code, out, _ = run(capsys, "--version")
    import mom_lit

    assert code == 0 and out.strip() == f"mom_lit {mom_lit.__version__} from {Path(mom_lit.__file__).parent}"


def test_shipped_configs_are_the_repository_configs():
    assert shipped_config_dir() == REPO / "configs"  # a source checkout: the folder the wheel installs
    assert shipped_config_names() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"quickstart", "mom_340m", "mom_1.3b", "mqar"} <= set(shipped_config_names())


def test_config_names_paths_and_inline_yaml_resolve(tmp_path, monkeypatch):
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    assert resolve_config("quickstart") == quickstart
    assert resolve_config("quickstart.yaml") == quickstart
    assert resolve_config("mom_1.3b") == str(REPO / "configs" / "mom_1.3b.yaml")
    inline = "{trainer: {max_steps: 2}}"
    assert resolve_config(inline) == inline
    # A file of the working directory wins over a shipped config of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("trainer: {max_steps: 1}\n")
    assert resolve_config("quickstart.yaml") == "quickstart.yaml"
    assert resolve_config_args(["fit", "-c", "mqar", "--config=quickstart.yaml", "--config", "quickstart",
                                "--trainer.max_steps=2"]) == [
        "fit", "-c", str(REPO / "configs" / "mqar.yaml"), "--config=quickstart.yaml", "--config", quickstart,
        "--trainer.max_steps=2"]


@pytest.mark.parametrize("value", ["quickstrat", "configs/quickstart.yaml", "quickstart.yml.bak"])
def test_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    with pytest.raises(UnknownConfigError) as info:
        resolve_config(value)
    assert str(info.value) == (f"--config {value}: no such file, and no shipped config of that name "
                               f"(shipped: {', '.join(shipped_config_names())})")


def test_fit_takes_a_config_by_name_and_keeps_its_paths_relative(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "fit", "--config", "quickstart", "--data.init_args.data_dir=data/mine",
                       "--print_config")
    assert code == 0
    printed = yaml.safe_load(out)
    shipped = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert printed["model"]["config"]["num_memories"] == shipped["model"]["config"]["num_memories"]
    assert printed["data"]["init_args"]["data_dir"] == "data/mine"
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "runs"  # the working directory's runs/
    code, _, err = run(capsys, "validate", "--config", "nosuch")
    assert code == 2 and err.startswith("mom-lit validate: error: --config nosuch: no such file")
    assert len(err.splitlines()) == 1


def test_each_verb_reaches_its_program(capsys, tmp_path):
    missing = str(tmp_path / "missing.ckpt")
    code, _, err = run(capsys, "convert", missing, str(tmp_path / "out"))
    assert code == 2 and err.startswith(f"mom-lit convert: error: source checkpoint {missing} does not exist")
    code, _, err = run(capsys, "generate", "--checkpoint", missing, "--prompt", "x")
    assert code == 2 and err.startswith("mom-lit generate: error:") and missing in err
    code, _, err = run(capsys, "prepare", str(tmp_path / "none"), "-o", str(tmp_path / "data"), "--quiet")
    assert code == 1 and err.startswith("mom-lit prepare: error:") and not (tmp_path / "data").exists()
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and out.startswith("usage: mom-lit convert")
    code, _, err = run(capsys, "evaluate", "length", "--max-length", "64")
    assert code == 1 and err == "--checkpoint is required (or --replot JSON)\n"
    code, out, _ = run(capsys, "evaluate", "length", "--help")
    assert code == 0 and out.startswith("usage: mom-lit evaluate length")

"""``mom-lit prepare`` on folders of files: selection, bad files, duplicates, splits, a trained BPE, failures."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mom_lit.data import prepare_cli as tool
from mom_lit.data.datamodule import TextDataModule
from mom_lit.data.prepare import META_FILENAME, read_meta
from mom_lit.data.sources import python_library_dirs
from mom_lit.data.tokenizers import load_tokenizer
from mom_lit.training.cli import cli_main
from test_training import TINY_QUICKSTART

ROOT = Path(__file__).parents[1]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    """(exit status, the JSON summary or None, stderr) of the tool's ``main``."""
    code = tool.main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _stream(split_dir: Path) -> torch.Tensor:
    """All tokens of a prepared split, in stored order."""
    from litdata import StreamingDataset, TokensLoader

    dims = [chunk["dim"] for chunk in json.loads((split_dir / "index.json").read_text())["chunks"]]
    dataset = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=math.gcd(*dims)))
    return torch.cat([torch.as_tensor(dataset[i]).long() for i in range(len(dataset))])


def _documents(split_dir: Path, tokenizer) -> list[str]:
    stream = _stream(split_dir).tolist()
    assert stream[-1] == tokenizer.eos_id
    docs, current = [], []
    for token in stream:
        if token == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


CODE = {
    "pkg/core.py": "def add(a, b):\n    return a + b\n",
    "pkg/util.py": "import os\n\n\ndef home():\n    return os.environ['HOME']  # <|endoftext|> in a string\n",
    "pkg/copy_of_core.py": "def add(a, b):\n    return a + b\n",  # a duplicate of core.py
    "pkg/__init__.py": "",  # empty
    "docs/guide.md": "# Guide\n\nCall `add(1, 2)`.\n",
    "docs/api.rst": "API\n===\n\n.. function:: add(a, b)\n",
    "tests/test_core.py": "from pkg.core import add\n\nassert add(1, 2) == 3\n",  # excluded
    "pkg/data.csv": "a,b\n1,2\n",  # matches no --include
    "pkg/__pycache__/core.cpython-311.py": "never read\n",  # __pycache__ is not entered
}
LATIN1 = "pkg/legacy.py"  # 'café' in latin-1: not UTF-8
BINARY = "pkg/blob.py"  # a NUL byte


def _write_code_corpus(root: Path, extra_files: int = 0) -> Path:
    src = root / "src"
    for rel, text in CODE.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    (src / LATIN1).write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    (src / BINARY).write_bytes(b"header\x00\x01\x02")
    for i in range(extra_files):
        (src / f"more/mod_{i:02d}.py").parent.mkdir(parents=True, exist_ok=True)
        (src / f"more/mod_{i:02d}.py").write_text(f"def f_{i}(x):\n    return x * {i} + {i * i}\n")
    return src


def _code_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [str(src), "--include", "*.py", "--include", "*.md", "--include", "*.rst", "--exclude", "tests/*",
            "-o", str(out), *extra]  # fmt: skip


def _kept_texts(src: Path, extra_files: int = 0) -> set[str]:
    names = {"pkg/core.py", "pkg/util.py", "docs/guide.md", "docs/api.rst"}
    texts = {CODE[n] for n in names}
    texts |= {(src / f"more/mod_{i:02d}.py").read_text() for i in range(extra_files)}
    return texts


# ------------------------------------------------------------------------------------------ selection
def test_python_library_dirs_are_this_interpreters() -> None:
    dirs = python_library_dirs()
    assert len(dirs) == len(set(dirs)) and all(d.is_dir() for d in dirs)
    assert Path(sysconfig.get_paths()["stdlib"]).resolve() in dirs
    assert Path(sysconfig.get_paths()["purelib"]).resolve() in dirs


def test_code_corpus_counts_and_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_code_corpus(tmp_path)
    code, summary, err = _run(capsys, *_code_args(src, tmp_path / "out", "--val_fraction", "0.25", "--seed", "0"))
    assert code == 0, err
    size = lambda rel: (src / rel).stat().st_size  # noqa: E731
    assert summary["files"] == {
        "seen": 10,  # every file outside __pycache__
        "kept": 4,
        "excluded": 1,
        "unmatched": 1,
        "binary": 1,
        "non_utf8": 1,
        "empty": 1,
        "duplicates": 1,
        "capped": 0,
    }
    assert summary["bytes"]["binary"] == size(BINARY) and summary["bytes"]["non_utf8"] == size(LATIN1)
    assert summary["bytes"]["duplicates"] == size("pkg/copy_of_core.py")
    assert summary["bytes"]["kept"] == sum(size(r) for r in ("pkg/core.py", "pkg/util.py", "docs/guide.md",
                                                             "docs/api.rst"))  # fmt: skip
    splits = summary["splits"]
    assert splits["train"]["files"] == 3 and splits["val"]["files"] == 1, "one document per file, split by file"
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == summary["bytes"]["kept"]
    byte = load_tokenizer("byte")
    docs = [d for split in ("train", "val") for d in _documents(tmp_path / "out" / split, byte)]
    assert sorted(docs) == sorted(_kept_texts(src)), "each kept file is one document, read exactly"
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == summary["bytes"]["kept"] + 4


def test_python_library_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--python_library alone is a source; the stdlib's json package stands in for the whole library."""
    out = tmp_path / "out"
    code, summary, err = _run(capsys, "--python_library", "--include", "json/*.py", "-o", str(out), "--val_fraction", "0")
    assert code == 0, err
    sources = read_meta(out / "train")["sources"]
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert str(stdlib / "json" / "decoder.py") in sources and summary["files"]["kept"] == len(sources)
    assert not any("__pycache__" in s for s in sources)


def test_nested_sources_read_each_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_code_corpus(tmp_path)
    code, summary, err = _run(capsys, *_code_args(src, tmp_path / "a", "--val_fraction", "0"))
    assert code == 0, err
    code, nested, err = _run(capsys, str(src / "pkg"), *_code_args(src, tmp_path / "b", "--val_fraction", "0"))
    assert code == 0, err
    assert nested["files"] == summary["files"]


def test_without_include_unsupported_files_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain text")
    (src / "b.csv").write_text("x,y\n")
    (src / "c.py").write_text("print(1)\n")
    code, summary, err = _run(capsys, str(src), "-o", str(tmp_path / "out"), "--val_fraction", "0")
    assert code == 0, err
    assert summary["files"]["kept"] == 1 and summary["files"]["unmatched"] == 2


def test_split_by_file_is_seeded_and_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_code_corpus(tmp_path, extra_files=16)
    val_sets = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        code, summary, err = _run(capsys, *_code_args(src, tmp_path / name, "--val_fraction", "0.3", "--seed", seed))
        assert code == 0, err
        val_sets[name] = set(read_meta(tmp_path / name / "val")["sources"])
        assert summary["splits"]["val"]["files"] == round(0.3 * 20)
    for split in ("train", "val"):
        assert torch.equal(_stream(tmp_path / "a" / split), _stream(tmp_path / "b" / split))
    assert val_sets["a"] == val_sets["b"] and val_sets["a"] != val_sets["c"]
    assert not val_sets["a"] & set(read_meta(tmp_path / "a" / "train")["sources"]), "a file lies in one split"


@pytest.mark.slow
def test_worker_processes_write_the_same_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """litdata's worker processes (a group of files per task) and the in-process writer agree token for token."""
    src = _write_code_corpus(tmp_path, extra_files=16)
    for name, workers in (("one", "0"), ("two", "2")):
        code, _, err = _run(capsys, *_code_args(src, tmp_path / name, "--val_fraction", "0", "--num_workers", workers))
        assert code == 0, err
    assert len(json.loads((tmp_path / "two" / "train" / "index.json").read_text())["chunks"]) == 2, "two workers ran"
    assert torch.equal(_stream(tmp_path / "one" / "train"), _stream(tmp_path / "two" / "train"))


def test_max_files_caps_the_kept_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_code_corpus(tmp_path, extra_files=16)
    code, summary, err = _run(capsys, *_code_args(src, tmp_path / "out", "--max_files", "7", "--val_fraction", "0.2"))
    assert code == 0, err
    assert summary["files"]["kept"] == 7 and summary["files"]["capped"] == 20 - 7
    assert sum(s["files"] for s in summary["splits"].values()) == 7


# ------------------------------------------------------------------------------------------ bad files
def test_bad_files_fail_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_code_corpus(tmp_path)
    (src / BINARY).unlink()
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_code_args(src, out, "--on_bad_file", "fail"))
    assert code == 1
    assert str(src / LATIN1) in err and "not UTF-8" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_non_utf8_txt_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("good text")
    (src / "latin.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    out = tmp_path / "out"
    code, summary, err = _run(capsys, str(src), "-o", str(out), "--val_fraction", "0", "--on_bad_file", policy)
    if policy == "fail":
        assert code == 1 and str(src / "latin.txt") in err and not out.exists()
        return
    assert code == 0, err
    assert summary["files"]["non_utf8"] == 1 and summary["bytes"]["non_utf8"] == 7
    assert _documents(out / "train", load_tokenizer("byte")) == ["good text"]


# ------------------------------------------------------------------------------------------ BPE
def test_trained_bpe_is_recorded_reused_and_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write_code_corpus(tmp_path, extra_files=12)
    first = tmp_path / "first"
    code, summary, err = _run(capsys, *_code_args(src, first, "--train_bpe", "300", "--val_fraction", "0.2"))
    assert code == 0, err
    tok_file = first / "tokenizer.json"
    record = {"path": "tokenizer.json", "sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest()}
    tok = load_tokenizer(str(tok_file))
    record["vocab_size"] = tok.base_vocab_size
    assert 257 < tok.base_vocab_size <= 300 and tok.vocab_size == 320
    assert summary["tokenizer"]["file"] == record
    for split in ("train", "val"):
        assert read_meta(first / split)["tokenizer_file"] == record
    docs = [d for split in ("train", "val") for d in _documents(first / split, tok)]
    assert sorted(docs) == sorted(_kept_texts(src, 12)), "byte-level BPE round-trips; a literal EOS text stays text"

    # Another machine: the same files and the recorded tokenizer give the same data.
    second = tmp_path / "second"
    code, again, err = _run(capsys, *_code_args(src, second, "--tokenizer", str(tok_file), "--val_fraction", "0.2"))
    assert code == 0, err
    assert (second / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert again["tokenizer"]["file"] == record
    for split in ("train", "val"):
        assert torch.equal(_stream(first / split), _stream(second / split))

    # Training finds the tokenizer (and its vocabulary size) from the data alone.
    dm = TextDataModule(str(first), seq_len=8, batch_size=2, shuffle=False)
    assert dm.vocab_size == tok.vocab_size and dm.eos_id == tok.eos_id
    assert dm.hparams["tokenizer"] == str(tok_file.resolve()), "checkpoints record the resolved tokenizer"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert int(batch["input_ids"].max()) < tok.base_vocab_size

    # Through the command line: the model's vocabulary follows, the resolved tokenizer is what checkpoints keep.
    monkeypatch.setattr(sys, "argv", ["mom_lit"])
    cli = cli_main([*TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                    f"--data.init_args.data_dir={first}", "--data.init_args.tokenizer=null",
                    "--data.init_args.seq_len=8", "--data.init_args.batch_size=2"], run=False)  # fmt: skip
    assert cli.model.config.vocab_size == tok.vocab_size
    assert cli.datamodule.hparams["tokenizer"] == str(tok_file.resolve())


def test_rerun_is_skipped_and_an_interrupted_bpe_run_keeps_its_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write_code_corpus(tmp_path, extra_files=12)
    out = tmp_path / "out"
    args = _code_args(src, out, "--train_bpe", "300", "--val_fraction", "0.2")
    assert _run(capsys, *args)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer.json", out / "train" / META_FILENAME)}
    train_stream = _stream(out / "train")
    assert _run(capsys, *args)[0] == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "tokenizer.json", out / "train" / META_FILENAME)}
    shutil.rmtree(out / "val")  # as if the run had stopped after the train split
    code, summary, err = _run(capsys, *args)
    assert code == 0, err
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamps["tokenizer.json"], "not trained again"
    assert torch.equal(_stream(out / "train"), train_stream) and summary["splits"]["val"]["files"] == 3


# ------------------------------------------------------------------------------------------ failures
def _left_behind(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_jsonl_is_streamed_and_checked_line_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "crlf.jsonl").write_bytes(b'{"text": "one"}\r\n\r\n{"text": "two \\u2028 lines"}\r\n')
    (src / "latin.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "out"
    code, summary, err = _run(capsys, str(src), "-o", str(out), "--val_fraction", "0", "--on_bad_file", policy)
    if policy == "fail":
        assert code == 1 and f"{src / 'latin.jsonl'}: not UTF-8 (line 2, byte 14)" in err and not out.exists()
        return
    assert code == 0, err
    assert summary["files"]["non_utf8"] == 1 and summary["splits"]["train"]["documents"] == 2
    assert _documents(out / "train", load_tokenizer("byte")) == ["one", "two \u2028 lines"]


def test_broken_jsonl_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "thr\n')
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(src), "-o", str(out), "--val_fraction", "0")
    assert code == 1 and f"{src} line 4: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_broken_parquet_is_named_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "table.parquet"
    src.write_bytes(b"PAR1 this is not a parquet file")
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(src), "-o", str(out), "--val_fraction", "0")
    assert code == 1 and f"{src}: not a readable parquet file" in err and "Traceback" not in err
    assert not out.exists()


def test_empty_input_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.csv").write_text("a,b\n")
    out = tmp_path / "out"
    code, _, err = _run(capsys, str(src), "-o", str(out))
    assert code == 1 and "no files of type" in err and "1 unmatched" in err
    assert not out.exists()
    out.mkdir()  # an existing, empty output folder stays empty: no lock file, no temporary folder
    (src / "empty.jsonl").write_text("\n\n")
    code, _, err = _run(capsys, str(src), "-o", str(out))
    assert code == 1 and "no documents found" in err
    assert _left_behind(out) == []


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.txt"
    src.write_text("text")
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code, _, err = _run(capsys, str(src), "-o", str(out))
    assert code == 1 and f"output_dir {out} is an existing file" in err
    code, _, err = _run(capsys, str(src), "-o", str(out / "below"))
    assert code == 1 and f"lies under {out}, which is an existing file" in err
    assert out.read_text() == "not a folder"


def test_failure_exit_code_through_a_subprocess(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "one"}\n{"body": "two"}\n')
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mom_lit", "prepare", str(src), "-o", str(out), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"mom-lit prepare: error: {src} line 2: no field 'text' (set text_field)"
    assert not out.exists()


def test_litdata_account_advertisement_is_dropped(tmp_path, capsys):
    """Worker processes write through litdata.optimize: its account advertisement is dropped, the rest is kept."""
    from mom_lit.data.prepare_cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 50)
    assert main([str(src), "-o", str(tmp_path / "out"), "--num_workers", "2", "--val_fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "lightning.ai" not in out
    assert '"splits"' in out  # the summary still reaches stdout

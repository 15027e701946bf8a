"""A built wheel, installed into a fresh virtual environment, runs every verb of ``mom-lit`` from a folder outside
the repository: prepare a tiny text folder, fit the quickstart config by name, generate, convert, evaluate (the
loss against context length, and lm_eval's tasks where lm_eval is installed).

The venv sees the system's site-packages (torch and the other dependencies are reused; nothing is downloaded) but
imports mom_lit from the wheel, which ``mom-lit --version`` shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mom_lit", "callbacks", "configs")  # what the build reads
TINY = ["--model.config.hidden_size=32", "--model.config.num_layers=1", "--model.config.head_dim=8",
        "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=1",
        "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
TINY_TASK = {"task": "tiny_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
             "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
             "metric_list": [{"metric": "acc"}]}


def _copy_sources(dest: Path) -> None:
    """The files the build reads, without caches or the links a checkout may hold inside the package."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info") or os.path.islink(Path(folder, n))]

    dest.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)


def _missing_build_backend() -> str | None:
    """Why the wheel cannot be built here without downloading anything, or None."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed: the wheel is built without build isolation (no download)"
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
    if version < (69,):
        return f"setuptools {setuptools.__version__} is older than the 69 pyproject.toml asks for"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} builds wheels only with the wheel package, not installed"
    return None


NO_BUILD_BACKEND = _missing_build_backend()
needs_build_backend = pytest.mark.skipif(NO_BUILD_BACKEND is not None, reason=NO_BUILD_BACKEND or "")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding the wheel built from this checkout; returns its ``bin`` folder."""
    root = tmp_path_factory.mktemp("install")
    _copy_sources(root / "src")  # the build writes build/ and *.egg-info beside the sources
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(root / "src"),
                    "-w", str(root / "wheels")], check=True, capture_output=True)
    (wheel,) = (root / "wheels").glob("mom_lit-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")],
                   check=True, capture_output=True)
    python = root / "venv" / "bin" / "python"
    # The system's pip installs into the venv when run by the venv's interpreter.
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, env=_env(root / "venv" / "bin"))
    return root / "venv" / "bin"


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the worktree must not shadow the wheel
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
@needs_build_backend
def test_installed_wheel_runs_every_verb_outside_the_repository(venv, tmp_path):
    work = tmp_path / "work"
    (work / "texts").mkdir(parents=True)
    for i in range(4):
        (work / "texts" / f"part{i}.txt").write_text(f"To be, or not to be, that is question {i}. " * 40)

    def mom_lit(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(venv / "mom-lit"), *args], cwd=work, env=_env(venv), capture_output=True,
                              text=True, timeout=300)
        assert (proc.returncode == 0) == ok, f"mom-lit {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    site = venv.parent / "lib"
    version = mom_lit("--version").stdout
    assert str(site) in version and str(REPO) not in version, version  # the wheel's copy, not the checkout's
    usage = mom_lit("--help").stdout
    assert all(f"  {verb}  " in usage for verb in ("fit", "validate", "test", "prepare", "generate", "convert",
                                                  "evaluate")), usage

    summary = json.loads(mom_lit("prepare", "texts", "-o", "data", "--val_fraction", "0.25", "--seed", "0",
                                 "--quiet").stdout)
    assert summary["splits"]["train"]["documents"] == 3 and summary["splits"]["val"]["documents"] == 1

    mom_lit("fit", "--config", "quickstart", "--data.init_args.data_dir=data", *TINY)
    checkpoint = work / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"  # relative to work/
    assert checkpoint.is_file()

    generated = mom_lit("generate", "--checkpoint", str(checkpoint), "--prompt", "To be", "--max_new_tokens", "4",
                        "--seed", "0")
    assert generated.stdout.startswith("To be") and "decode: 4 tokens" in generated.stderr

    assert mom_lit("convert", str(checkpoint), "exported").stdout.strip() == "exported"
    assert (work / "exported" / "model.safetensors").is_file()

    table = mom_lit("evaluate", "length", "--checkpoint", "exported", "--text", "texts", "--max-length", "64",
                    "--chunk-size", "32", "--first-bucket", "32").stdout
    assert table.splitlines()[2:] and [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "0-32", "32-64"], table

    if importlib.util.find_spec("lm_eval") is None:
        refused = mom_lit("evaluate", "--tasks", "x", ok=False)
        assert "mom-lit evaluate needs lm-evaluation-harness: pip install 'mom_lit[eval]'" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        return
    data = REPO / "tests" / "data" / "lm_eval_tiny.jsonl"
    (work / "tasks").mkdir()
    (work / "tasks" / "tiny_mc.yaml").write_text(json.dumps({**TINY_TASK, "dataset_kwargs": {
        "data_files": {"test": str(data)}}}))  # JSON is YAML
    mom_lit("evaluate", "--model", "mom_lit", "--model_args", "checkpoint=exported", "--tasks", "tiny_mc",
            "--include_path", "tasks", "--device", "cpu", "--output_path", "results")
    (result,) = (work / "results").rglob("results_*.json")
    accuracy = json.loads(result.read_text())["results"]["tiny_mc"]["acc,none"]
    assert accuracy * 5 == pytest.approx(round(accuracy * 5))  # a share of the file's 5 questions


@pytest.mark.slow
@needs_build_backend
def test_editable_install_finds_the_shipped_configs_in_the_checkout(tmp_path):
    """``pip install -e .`` maps the package onto the checkout: the configs are read from its ``configs/``."""
    _copy_sources(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(tmp_path / "venv")],
                   check=True, capture_output=True)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps",
                    "--no-index", "--no-build-isolation", "-q", "-e", str(tmp_path / "src")], check=True,
                   capture_output=True, env=_env(bin_dir))
    # A mark only this checkout's copy of the config carries: the command must read it from there.
    config = tmp_path / "src" / "configs" / "quickstart.yaml"
    assert "\nseed_everything: 1234\n" in config.read_text()
    config.write_text(config.read_text().replace("\nseed_everything: 1234\n", "\nseed_everything: 4321\n"))
    (tmp_path / "work").mkdir()
    proc = subprocess.run([str(bin_dir / "mom-lit"), "fit", "--config", "quickstart", "--print_config"],
                          cwd=tmp_path / "work", env=_env(bin_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "\nseed_everything: 4321\n" in proc.stdout

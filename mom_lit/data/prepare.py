"""Tokenise local text files into litdata token chunks, one folder per split.

Sources are ``.txt`` files (a file is one document), ``.jsonl`` files (a non-blank line is one document, its
text in a configurable field) and ``.parquet`` files (a row is one document, needs ``pyarrow``), or folders
searched recursively for them. Every document is followed by the tokeniser's EOS id.

Layout written under ``output_dir``::

    train/  index.json  chunk-*.bin  mom_lit_meta.json
    val/    ...                                          (when val_fraction > 0)
    test/   ...                                          (when test_fraction > 0)

With several workers and source files, ``litdata.optimize`` tokenises in worker processes, one source file per
task, each file's documents in order. With one worker (or one file) the same chunk writer runs in the calling
process, which avoids the seconds it takes to start a worker.

Documents are assigned to splits by a seeded permutation over all documents, so the split is reproducible
and exact (``round(fraction * N)`` documents, at least one when the fraction is positive).

Preparation is resumable at split granularity: a split whose ``mom_lit_meta.json`` records the same recipe
(sources with their sizes and modification times, tokeniser, field, fractions, seed) is kept as is. Each split
is written to a temporary folder and renamed into place when complete, under a file lock, so an interrupted
or concurrent run never leaves a half-written split behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom_lit.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "META_FILENAME",
    "SPLITS",
    "SUPPORTED_SUFFIXES",
    "count_documents",
    "discover_sources",
    "iter_documents",
    "prepare_dataset",
    "read_meta",
]

logger = logging.getLogger("mom_lit")

META_FILENAME = "mom_lit_meta.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
FORMAT = "mom_lit.tokens/1"
_LOCK_NAME = ".mom_lit_prepare.lock"
_TMP_PREFIX = ".tmp-"
_ENCODE_BATCH = 256


def discover_sources(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """Files to tokenise: the given files plus every supported file under the given folders, sorted per folder."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not inside:
                raise ValueError(f"no {'/'.join(SUPPORTED_SUFFIXES)} files found under {path}")
            found.extend(inside)
        elif path.is_file():
            if path.suffix not in SUPPORTED_SUFFIXES:
                raise ValueError(f"unsupported source {path}: expected one of {SUPPORTED_SUFFIXES} or a folder")
            found.append(path)
        else:
            raise FileNotFoundError(f"source {path} does not exist")
    if not found:
        raise ValueError("no sources given")
    return [p.resolve() for p in found]


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    return pq.ParquetFile(path)


def count_documents(path: Path) -> int:
    """Number of documents in one source file (blank jsonl lines are not documents)."""
    if path.suffix == ".txt":
        return 1
    if path.suffix == ".jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if path.suffix == ".parquet":
        return int(_parquet_file(path).metadata.num_rows)
    raise ValueError(f"unsupported source {path}")


def _document_text(value: Any, path: Path, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path} {where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def iter_documents(path: Path, text_field: str = "text", keep: np.ndarray | None = None) -> Iterator[str]:
    """Texts of the documents of ``path`` in file order, restricted to those where ``keep`` (bool, (N,)) is set."""
    if path.suffix == ".txt":
        if keep is None or keep[0]:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    if path.suffix == ".jsonl":
        row = 0
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if keep is None or keep[row]:
                    record = json.loads(line)
                    if not isinstance(record, dict) or text_field not in record:
                        raise ValueError(f"{path} line {line_no}: no field {text_field!r} (set text_field)")
                    yield _document_text(record[text_field], path, f"line {line_no}", text_field)
                row += 1
        return
    if path.suffix == ".parquet":
        parquet = _parquet_file(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} among {parquet.schema_arrow.names} (set text_field)")
        row = 0
        for record_batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for value in record_batch.column(0).to_pylist():
                if keep is None or keep[row]:
                    yield _document_text(value, path, f"row {row}", text_field)
                row += 1
        return
    raise ValueError(f"unsupported source {path}")


def token_dtype(vocab_size: int) -> torch.dtype:
    """Narrowest stored integer type for ``vocab_size`` ids."""
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


class _TokenizeWork:
    """The per-item function run by litdata workers: tokenise one source file's documents of one split.

    ``item`` is an index into ``self.work``; passing indices (not paths) keeps litdata from treating the
    inputs as files to download.
    """

    def __init__(
        self, tokenizer: Tokenizer, work: list[tuple[Path, np.ndarray]], text_field: str, dtype: torch.dtype
    ) -> None:
        self.tokenizer = tokenizer
        self.work = work
        self.text_field = text_field
        self.dtype = dtype

    def _encode(self, texts: list[str]) -> Iterator[torch.Tensor]:
        eos = self.tokenizer.eos_id
        if isinstance(self.tokenizer, ByteTokenizer):
            for text in texts:
                data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
                yield torch.from_numpy(np.append(data.astype(np.int32), eos)).to(self.dtype)
            return
        for ids in self.tokenizer.encode_batch(texts):
            yield torch.tensor([*ids, eos], dtype=torch.int64).to(self.dtype)

    def __call__(self, item: int) -> Iterator[torch.Tensor]:
        path, keep = self.work[item]
        texts: list[str] = []
        for text in iter_documents(path, self.text_field, keep):
            if not text:
                continue  # an empty document would only add a lone EOS
            texts.append(text)
            if len(texts) == _ENCODE_BATCH:
                yield from self._encode(texts)
                texts = []
        if texts:
            yield from self._encode(texts)


def read_meta(split_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``mom_lit_meta.json`` of a prepared split folder."""
    path = Path(split_dir) / META_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {split_dir} is not a split prepared by mom_lit")
    return json.loads(path.read_text())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An inter-process lock on ``path`` (created if needed)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


@contextlib.contextmanager
def _isolated_optimize(cache_root: Path) -> Iterator[None]:
    """Undo what ``litdata.optimize`` changes in the calling process.

    It forces the multiprocessing start method, installs a SIGINT handler, exports ``DATA_OPTIMIZER_*``
    variables and clears a cache folder shared by every run on the machine; a private cache folder and a
    restore afterwards keep a preparation inside a training process from disturbing it.
    """
    saved_env = {k: v for k, v in os.environ.items() if k.startswith("DATA_OPTIMIZER_")}
    saved_method = multiprocessing.get_start_method(allow_none=True)
    main_thread = threading.current_thread() is threading.main_thread()
    saved_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(cache_root / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(cache_root / "data")
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("DATA_OPTIMIZER_")]:
            del os.environ[key]
        os.environ.update(saved_env)
        multiprocessing.set_start_method(saved_method, force=True)
        if main_thread and saved_sigint is not None:
            signal.signal(signal.SIGINT, saved_sigint)
        shutil.rmtree(cache_root, ignore_errors=True)


def _assign_splits(num_docs: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """(num_docs,) int8 split index per document (0 train, 1 val, 2 test)."""
    num_val, num_test = (max(1, round(f * num_docs)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    if num_val + num_test >= num_docs:
        raise ValueError(
            f"{num_docs} documents leave none for train with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}"
        )
    order = np.random.default_rng(seed).permutation(num_docs)
    split = np.zeros(num_docs, dtype=np.int8)
    split[order[:num_val]] = 1
    split[order[num_val : num_val + num_test]] = 2
    return split


def _recipe(
    sources: list[Path], tokenizer: Tokenizer, text_field: str, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "sources": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources],
        "text_field": text_field,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
    }


def _write_in_process(tmp: Path, fn: _TokenizeWork, chunk_tokens: int, split: str, verbose: bool) -> None:
    """The single-process path: litdata's chunk writer fed directly, no worker process to start."""
    from litdata import TokensLoader
    from litdata.streaming.writer import BinaryWriter
    from tqdm.auto import tqdm

    tmp.mkdir(parents=True)
    writer = BinaryWriter(str(tmp), chunk_size=chunk_tokens, item_loader=TokensLoader())
    written = 0
    for item in tqdm(range(len(fn.work)), desc=f"tokenising {split}", unit="file", disable=not verbose):
        for tokens in fn(item):
            writer[written] = tokens
            written += 1
    if written:
        writer.done()
        writer.merge()
    else:
        (tmp / "index.json").write_text(json.dumps({"chunks": [], "config": None}))


def _write_with_optimize(tmp: Path, fn: _TokenizeWork, chunk_tokens: int, workers: int, verbose: bool) -> None:
    """The multi-process path: ``litdata.optimize`` with one source file per task."""
    from litdata import TokensLoader, optimize

    with _isolated_optimize(tmp.parent / f"{_TMP_PREFIX}litdata-{uuid.uuid4().hex[:8]}"):
        optimize(
            fn=fn,
            inputs=list(range(len(fn.work))),
            output_dir=str(tmp),
            weights=[max(1, int(path.stat().st_size * keep.mean())) for path, keep in fn.work],
            chunk_size=chunk_tokens,
            item_loader=TokensLoader(),
            num_workers=workers,
            reorder_files=False,
            keep_data_ordered=True,  # a static assignment of files to workers: reproducible chunks
            start_method="spawn",
            verbose=verbose,
        )


def _write_split(
    out_dir: Path,
    split: str,
    work: list[tuple[Path, np.ndarray]],
    tokenizer: Tokenizer,
    text_field: str,
    recipe: dict[str, Any],
    num_workers: int,
    chunk_tokens: int,
    verbose: bool,
) -> dict[str, Any]:
    tmp = out_dir / f"{_TMP_PREFIX}{split}-{uuid.uuid4().hex[:8]}"
    dtype = token_dtype(tokenizer.vocab_size)
    fn = _TokenizeWork(tokenizer, work, text_field, dtype)
    workers = min(num_workers, len(work))
    if workers <= 1:
        _write_in_process(tmp, fn, chunk_tokens, split, verbose)
    else:
        _write_with_optimize(tmp, fn, chunk_tokens, workers, verbose)
    index = json.loads((tmp / "index.json").read_text())
    num_tokens = sum(int(chunk["dim"] or 0) for chunk in index["chunks"])
    num_documents = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    if num_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"no tokens were written for split {split!r} of {out_dir}: every selected document is empty, "
            "or the tokenising workers failed (see their errors above)"
        )
    meta = {
        "format": FORMAT,
        "split": split,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": str(dtype).removeprefix("torch."),
        "num_tokens": num_tokens,
        "num_documents": num_documents,
        "sources": [str(path) for path, keep in work if keep.any()],
        "recipe": recipe,
    }
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
    final = out_dir / split
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one file system: readers see no split or a complete one
    return meta


def prepare_dataset(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    tokenizer: str | Tokenizer = "byte",
    *,
    text_field: str = "text",
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 42,
    num_workers: int = 0,
    chunk_tokens: int = 1 << 23,
    eos_token: str | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, dict[str, Any]]:
    """Tokenise ``sources`` into litdata token chunks under ``output_dir/{train,val,test}``.

    Args:
        sources: files (.txt, .jsonl, .parquet) and/or folders searched recursively for them.
        output_dir: where the split folders go.
        tokenizer: a spec for :func:`~mom_lit.data.tokenizers.load_tokenizer` or a tokeniser.
        text_field: the field of jsonl records / column of parquet files holding the text.
        val_fraction: share of documents for the validation split (0 writes none).
        test_fraction: share of documents for the test split (0 writes none).
        seed: seed of the document permutation that assigns splits.
        num_workers: tokenising processes for ``litdata.optimize`` (a source file is the unit of work); with
            0 or 1, or a single source file, tokenisation runs in this process (same output format).
        chunk_tokens: tokens per litdata chunk; each chunk's tail shorter than a training block is unused.
        eos_token: end-of-document token of a ``tokenizer.json`` without a standard one.
        overwrite: replace splits prepared with a different recipe instead of failing.
        verbose: show litdata's progress bar and log what is skipped.

    Returns:
        The metadata of every split, keyed by split name.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not text_field:
        raise ValueError("text_field must be a non-empty string")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    files = discover_sources(sources)
    out_dir = Path(output_dir).expanduser().resolve()
    recipe = json.loads(json.dumps(_recipe(files, tok, text_field, val_fraction, test_fraction, seed)))
    wanted = [name for name, frac in zip(SPLITS, (1.0, val_fraction, test_fraction)) if frac > 0]

    metas: dict[str, dict[str, Any]] = {}
    with file_lock(out_dir / _LOCK_NAME):
        for stale in out_dir.glob(_TMP_PREFIX + "*"):  # left by an interrupted run; the lock says none is live
            shutil.rmtree(stale, ignore_errors=True)
        todo = []
        for split in wanted:
            final = out_dir / split
            if (final / META_FILENAME).is_file():
                meta = read_meta(final)
                if meta.get("recipe") == recipe:
                    if verbose:
                        logger.info("%s is up to date, skipped", final)
                    metas[split] = meta
                    continue
                if not overwrite:
                    changed = sorted(k for k in recipe if meta.get("recipe", {}).get(k) != recipe[k])
                    raise FileExistsError(
                        f"{final} was prepared with a different recipe (differs in {changed}); "
                        "pass overwrite=True (--overwrite) to replace it"
                    )
            elif final.exists() and not overwrite:
                raise FileExistsError(f"{final} exists but has no {META_FILENAME}; pass overwrite=True to replace it")
            todo.append(split)
        if not todo:
            return metas

        counts = [count_documents(path) for path in files]
        total = sum(counts)
        if total == 0:
            raise ValueError(f"no documents found in {[str(p) for p in files]}")
        assignment = _assign_splits(total, val_fraction, test_fraction, seed)
        offsets = np.cumsum([0, *counts])
        for split in todo:
            index = SPLITS.index(split)
            work = []
            for path, start, stop in zip(files, offsets[:-1], offsets[1:]):
                keep = assignment[start:stop] == index
                if keep.any():
                    work.append((path, keep))
            metas[split] = _write_split(
                out_dir, split, work, tok, text_field, recipe, num_workers, chunk_tokens, verbose
            )
    return {split: metas[split] for split in wanted}

"""Tokenise local text files into litdata token chunks, one folder per split.

Sources are files or folders (see :mod:`mom_lit.data.sources` for how files are chosen and read): by default
``.txt`` files (a file is one document), ``.jsonl`` files (a non-blank line is one document, its text in a
configurable field) and ``.parquet`` files (a row is one document, needs ``pyarrow``); with ``include`` globs,
the matching files of any suffix as plain-text documents (a corpus of source code, say). Binary and non-UTF-8
files are skipped (or fail, ``on_bad_file``), identical files are kept once, and every count lands in the
metadata. Every document is followed by the tokeniser's EOS id.

Layout written under ``output_dir``::

    tokenizer.json                                       (a Hugging Face tokeniser: trained or given)
    train/  index.json  chunk-*.bin  mom_lit_meta.json
    val/    ...                                          (when val_fraction > 0)
    test/   ...                                          (when test_fraction > 0)

The tokeniser is ``"byte"``, a given ``tokenizer.json`` (copied into ``output_dir``), or a byte-level BPE
trained here on (a seeded sample of) the train split's documents (``train_bpe``). Each split's metadata records
the ``tokenizer.json`` by its path relative to ``output_dir``, its sha256 and vocabulary size, so a training run
finds it from the data alone and another machine can rebuild the same data from the same files and tokeniser.

Tokenisation runs in this process (Hugging Face tokenisers encode each batch of documents on all cores), or,
with several workers, through ``litdata.optimize`` in worker processes, a group of consecutive files per task.

Documents are assigned to splits by a seeded permutation over all documents, so the split is reproducible
and exact (``round(fraction * N)`` documents, at least one when the fraction is positive); a text file is one
document, so such files are split by file.

Every input is read and checked before anything is written. Preparation is resumable at split granularity:
a split whose ``mom_lit_meta.json`` records the same recipe (the discovered files with their sizes and
modification times, the selection, the tokeniser, field, fractions, seed) is kept as is. Each split is written
to a temporary folder and renamed into place when complete, under a file lock, so an interrupted or
concurrent run never leaves a half-written split behind; a failed run removes what it wrote (the whole output
folder if it created it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mom_lit.data.prepared import (FORMAT, META_FILENAME, SPLITS, TOKENIZER_FILENAME, read_meta, recorded_tokenizer,
                                   summarize)
from mom_lit.data.sources import (
    BAD_FILE_POLICIES,
    SUPPORTED_SUFFIXES,
    CorpusStats,
    ScannedFile,
    discover,
    discover_sources,
    iter_documents,
    python_library_dirs,
    scan,
)
from mom_lit.data.token_writer import (TMP_PREFIX, TokenizeWork, group_tasks, token_dtype, write_in_process,
                                       write_with_optimize)
from mom_lit.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer, train_byte_level_bpe

__all__ = [
    "META_FILENAME",
    "SPLITS",
    "SUPPORTED_SUFFIXES",
    "TOKENIZER_FILENAME",
    "discover_sources",
    "iter_documents",
    "prepare_dataset",
    "read_meta",
    "recorded_tokenizer",
    "summarize",
]

logger = logging.getLogger("mom_lit")

_LOCK_NAME = ".mom_lit_prepare.lock"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An inter-process lock on ``path`` (created if needed)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


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


def _cap_files(kept: list[ScannedFile], max_files: int | None, seed: int, stats: CorpusStats) -> list[ScannedFile]:
    """At most ``max_files`` files, a seeded choice that keeps their order."""
    if max_files is None or len(kept) <= max_files:
        return kept
    chosen = set(np.random.default_rng([seed, 1]).choice(len(kept), max_files, replace=False).tolist())
    for i, file in enumerate(kept):
        if i not in chosen:
            stats.add("capped", file.source.size)
    return [file for i, file in enumerate(kept) if i in chosen]


def _bpe_sample(files: list[ScannedFile], keeps: list[np.ndarray], text_field: str, budget: float, seed: int):
    """Train documents of a seeded order of the files until ``budget`` bytes are taken."""
    taken = 0
    for i in np.random.default_rng([seed, 2]).permutation(len(files)).tolist():
        if not keeps[i].any():
            continue
        source = files[i].source
        for text in iter_documents(source.path, text_field, keeps[i], source.kind):
            yield text
            taken += len(text.encode("utf-8"))
            if taken >= budget:
                return


def _tokenizer_record(path: Path, root: Path, tok: HFTokenizer) -> dict[str, Any]:
    return {
        "path": path.relative_to(root).as_posix(),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "vocab_size": tok.base_vocab_size,
    }


def _install_tokenizer(tok: Tokenizer, out_dir: Path) -> tuple[Tokenizer, dict[str, Any] | None]:
    """Put a file-based tokeniser into ``out_dir`` (atomically); (the tokeniser read from there, its record)."""
    if not isinstance(tok, HFTokenizer):
        return tok, None
    final = out_dir / TOKENIZER_FILENAME
    if not (final.is_file() and final.read_bytes() == tok.path.read_bytes()):
        tmp = out_dir / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{TOKENIZER_FILENAME}"
        shutil.copyfile(tok.path, tmp)
        os.replace(tmp, final)
    installed = HFTokenizer(final, eos_token=tok.eos_token)
    return installed, _tokenizer_record(final, out_dir, installed)


def _recipe(
    files: Sequence[Any], tokenizer: Tokenizer | None, settings: dict[str, Any], train_bpe: int | None, bpe_mb: float
) -> dict[str, Any]:
    listing = json.dumps([[str(f.path), f.size, f.mtime_ns, f.kind] for f in files])
    if tokenizer is not None:
        tok = {"fingerprint": tokenizer.fingerprint, "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    else:
        tok = {"train_bpe": train_bpe, "bpe_sample_mb": bpe_mb}
    recipe = {
        "format": FORMAT,
        "sources_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "num_sources": len(files),
        **settings,
        "tokenizer": tok,
    }
    return json.loads(json.dumps(recipe))  # as read back from a file: tuples become lists


def _write_split(
    out_dir: Path,
    split: str,
    files: list[ScannedFile],
    keeps: list[np.ndarray],
    tokenizer: Tokenizer,
    text_field: str,
    extra_meta: dict[str, Any],
    num_workers: int,
    chunk_tokens: int,
    verbose: bool,
) -> dict[str, Any]:
    tmp = out_dir / f"{TMP_PREFIX}{split}-{uuid.uuid4().hex[:8]}"
    dtype = token_dtype(tokenizer.vocab_size)
    work, sizes = group_tasks(files, keeps, num_workers)
    weights = [max(1, size) for size in sizes]
    fn = TokenizeWork(tokenizer, work, text_field, dtype)
    workers = min(num_workers, len(work))
    try:
        if workers <= 1:
            write_in_process(tmp, fn, chunk_tokens, split, verbose)
        else:
            write_with_optimize(tmp, fn, weights, chunk_tokens, workers, verbose)
        index = json.loads((tmp / "index.json").read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    num_tokens = sum(int(chunk["dim"] or 0) for chunk in index["chunks"])
    num_documents = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    if num_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"no tokens were written for split {split!r} of {out_dir}: every selected document is empty, "
            "or the tokenising workers failed (see their errors above)"
        )
    contributing = [(f, k) for f, k in zip(files, keeps) if k.any()]
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
        "num_files": len(contributing),
        "num_bytes": sum(int(f.doc_bytes[k].sum()) for f, k in contributing),
        **extra_meta,
        "sources": [str(f.source.path) for f, _ in contributing],
    }
    (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
    final = out_dir / split
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # atomic on one file system: readers see no split or a complete one
    return meta


def _check_output_dir(out_dir: Path) -> None:
    for path in (out_dir, *out_dir.parents):
        if path.exists() and not path.is_dir():
            what = "is" if path == out_dir else f"lies under {path}, which is"
            raise FileExistsError(f"output_dir {out_dir} {what} an existing file, not a folder")


def _existing_splits(
    out_dir: Path, wanted: list[str], recipe: dict[str, Any], overwrite: bool, verbose: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(metadata of the splits already prepared with ``recipe``, the splits still to write)."""
    metas: dict[str, dict[str, Any]] = {}
    todo = []
    for split in wanted:
        final = out_dir / split
        if (final / META_FILENAME).is_file():
            meta = read_meta(final)
            if meta.get("recipe") == recipe:
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
    if verbose:
        for split in metas:
            logger.info("%s is up to date, skipped", out_dir / split)
    return metas, todo


def _recorded_tokenizer_if_intact(out_dir: Path, metas: dict[str, dict[str, Any]]) -> Tokenizer | None:
    """The trained tokeniser of up-to-date splits, if its file is still the one they record."""
    records = {json.dumps(meta.get("tokenizer_file"), sort_keys=True) for meta in metas.values()}
    record = next(iter(metas.values())).get("tokenizer_file") if len(records) == 1 else None
    if not record:
        return None
    path = out_dir / record["path"]
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        return None
    return HFTokenizer(path)


def prepare_dataset(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    tokenizer: str | Tokenizer | None = None,
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
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    python_library: bool = False,
    on_bad_file: str = "skip",
    max_files: int | None = None,
    train_bpe: int | None = None,
    bpe_sample_mb: float = 64.0,
) -> dict[str, dict[str, Any]]:
    """Tokenise ``sources`` into litdata token chunks under ``output_dir/{train,val,test}``.

    Args:
        sources: files and/or folders searched recursively (see :mod:`mom_lit.data.sources`).
        output_dir: where the split folders (and a ``tokenizer.json``) go.
        tokenizer: a spec for :func:`~mom_lit.data.tokenizers.load_tokenizer` or a tokeniser; None is
            ``"byte"``, or the tokeniser trained with ``train_bpe``.
        text_field: the field of jsonl records / column of parquet files holding the text.
        val_fraction: share of documents for the validation split (0 writes none).
        test_fraction: share of documents for the test split (0 writes none).
        seed: seed of the document permutation that assigns splits (and of ``max_files`` and the BPE sample).
        num_workers: tokenising processes for ``litdata.optimize`` (a group of files is the unit of work); with
            0 or 1, or a single group, tokenisation runs in this process (same output format).
        chunk_tokens: tokens per litdata chunk; each chunk's tail shorter than a training block is unused.
        eos_token: end-of-document token of a ``tokenizer.json`` without a standard one.
        overwrite: replace splits prepared with a different recipe instead of failing.
        verbose: show progress bars and log what is skipped.
        include: globs of files read as plain-text documents whatever their suffix; none reads
            ``.txt``/``.jsonl``/``.parquet`` files by suffix.
        exclude: globs of files never read.
        python_library: add this interpreter's standard library and site-packages folders to ``sources``.
        on_bad_file: ``"skip"`` (counted in the metadata) or ``"fail"`` on a binary or non-UTF-8 file.
        max_files: keep at most this many files after deduplication (a seeded choice).
        train_bpe: train a byte-level BPE tokeniser of this vocabulary size on the train split.
        bpe_sample_mb: train the BPE on a seeded sample of at most this many MB (10^6 bytes) of train text.

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
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    if train_bpe is not None:
        if tokenizer is not None:
            raise ValueError(f"give either tokenizer ({tokenizer!r}) or train_bpe ({train_bpe}), not both")
        if train_bpe < 257:
            raise ValueError(f"train_bpe must be at least 257 (256 bytes and EOS), got {train_bpe}")
        if not bpe_sample_mb > 0:
            raise ValueError(f"bpe_sample_mb must be > 0, got {bpe_sample_mb}")
    out_dir = Path(output_dir).expanduser().resolve()
    _check_output_dir(out_dir)
    tok = None if train_bpe is not None else load_tokenizer(tokenizer or "byte", eos_token=eos_token)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    all_sources = [*sources, *(python_library_dirs() if python_library else [])]
    if not all_sources:
        raise ValueError("no sources given (name files or folders, or use python_library)")

    stats = CorpusStats()
    files = discover(all_sources, include, exclude, stats)
    settings = {
        "include": list(include),
        "exclude": list(exclude),
        "on_bad_file": on_bad_file,
        "max_files": max_files,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    recipe = _recipe(files, tok, settings, train_bpe, bpe_sample_mb)
    wanted = [name for name, frac in zip(SPLITS, (1.0, val_fraction, test_fraction)) if frac > 0]
    metas, todo = _existing_splits(out_dir, wanted, recipe, overwrite, verbose)
    if train_bpe is not None and todo and metas:
        tok = _recorded_tokenizer_if_intact(out_dir, metas)  # an interrupted run: keep the splits it wrote
        if tok is None:
            metas, todo = {}, wanted
    if not todo:
        return {split: metas[split] for split in wanted}

    # Read everything (nothing is written yet): bad files, duplicates, the split of every document.
    kept = _cap_files(scan(files, text_field, on_bad_file, stats, verbose), max_files, seed, stats)
    for file in kept:
        stats.add("kept", file.source.size)
    counts = [file.num_documents for file in kept]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"no documents found in {len(files)} files of {[str(s) for s in all_sources]}")
    assignment = _assign_splits(total, val_fraction, test_fraction, seed)
    offsets = np.cumsum([0, *counts])
    keeps_by_split = {
        split: [assignment[a:b] == SPLITS.index(split) for a, b in zip(offsets[:-1], offsets[1:])] for split in wanted
    }

    created = not out_dir.exists()
    lock = out_dir / _LOCK_NAME
    lock_existed = lock.exists()
    try:
        with tempfile.TemporaryDirectory(prefix="mom_lit_bpe-") as scratch:
            if tok is None:
                assert train_bpe is not None
                if verbose:
                    logger.info("training a byte-level BPE of %d tokens on the train split", train_bpe)
                texts = _bpe_sample(kept, keeps_by_split["train"], text_field, bpe_sample_mb * 1e6, seed)
                tok = train_byte_level_bpe(texts, train_bpe, Path(scratch) / TOKENIZER_FILENAME, show_progress=verbose)
            with file_lock(lock):
                done, _ = _existing_splits(out_dir, todo, recipe, overwrite=True, verbose=False)
                if len(done) == len(todo):  # written by a concurrent run while this one waited for the lock
                    metas.update(done)
                    return {split: metas[split] for split in wanted}
                for stale in out_dir.glob(TMP_PREFIX + "*"):  # left by an interrupted run; the lock says none is live
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
                tok, record = _install_tokenizer(tok, out_dir)
                extra = {"tokenizer_file": record, "corpus": stats.as_dict(), "recipe": recipe}
                for split in todo:
                    metas[split] = _write_split(
                        out_dir, split, kept, keeps_by_split[split], tok, text_field, extra,
                        num_workers, chunk_tokens, verbose,
                    )  # fmt: skip
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif not lock_existed:
            lock.unlink(missing_ok=True)
        raise
    return {split: metas[split] for split in wanted}

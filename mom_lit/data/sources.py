"""Source files of a corpus: which files are read, as what, and which are skipped (with counts).

Discovery walks the given folders (``__pycache__`` folders excluded) and classifies every file:

- excluded: it matches an ``exclude`` glob;
- text: it matches an ``include`` glob; the file is one plain-text document, whatever its suffix;
- by suffix (only without ``include`` globs): ``.txt`` (one document), ``.jsonl`` (a non-blank line is one
  document) or ``.parquet`` (a row is one document);
- unmatched: anything else (counted, never read).

A glob matches the file's name or its path relative to the folder it was found in (``fnmatch``, where ``*``
also matches ``/``). Scanning then reads every candidate once: binary files (a NUL byte) and files that are not
UTF-8 are skipped or fail (``on_bad_file``), empty files are dropped, identical files (same bytes) are kept
once, and jsonl / parquet files are parsed in full so that a malformed record fails here, naming the file and
line or row, before anything is written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import stat
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "discover_sources",
    "iter_documents",
    "BAD_FILE_POLICIES",
    "SUPPORTED_SUFFIXES",
    "CorpusStats",
    "ScannedFile",
    "SourceFile",
    "discover",
    "python_library_dirs",
    "scan",
]

logger = logging.getLogger("mom_lit")

SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
BAD_FILE_POLICIES: tuple[str, ...] = ("skip", "fail")
_KIND_BY_SUFFIX = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_SKIPPED_DIRS = frozenset({"__pycache__"})
_SCAN_THREADS = 8  # file reads and hashing release the GIL


@dataclass(frozen=True)
class SourceFile:
    """A file to read: its absolute path, its path relative to its source folder (for globs), how to read it."""

    path: Path
    rel: str
    kind: str  # "text" | "jsonl" | "parquet"
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScannedFile:
    """A file kept after scanning; ``doc_bytes`` (N,) holds the UTF-8 size of each of its N documents."""

    source: SourceFile
    doc_bytes: np.ndarray

    @property
    def num_documents(self) -> int:
        return int(self.doc_bytes.size)


@dataclass
class CorpusStats:
    """Counts of files (and their bytes) by what became of them."""

    files: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, size: int) -> None:
        self.files[what] = self.files.get(what, 0) + 1
        self.bytes[what] = self.bytes.get(what, 0) + size

    def as_dict(self) -> dict[str, Any]:
        order = ("seen", "kept", "excluded", "unmatched", "binary", "non_utf8", "empty", "duplicates", "capped")
        return {
            "files": {k: self.files.get(k, 0) for k in order},
            "bytes": {k: self.bytes.get(k, 0) for k in order},
        }


def python_library_dirs() -> list[Path]:
    """This interpreter's standard library and site-packages folders (existing ones, without repeats)."""
    paths = sysconfig.get_paths()
    found: list[Path] = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = Path(paths[key]).resolve()
        if path.is_dir() and path not in found:
            found.append(path)
    return found


def _compile(globs: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(fnmatch.translate(g)) for g in globs]


def _matches(patterns: Sequence[re.Pattern[str]], name: str, rel: str) -> bool:
    return any(p.match(name) or p.match(rel) for p in patterns)


def _walk(folder: str) -> list[tuple[os.DirEntry[str], str]]:
    """(entry, its posix path relative to ``folder``) of every non-folder below ``folder``, sorted by relative
    path. ``__pycache__`` folders and links to folders are not entered (as ``os.walk`` does)."""
    found = []
    stack = [(folder, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as err:
            raise OSError(f"cannot list {directory}: {err.strerror or err}") from err
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _SKIPPED_DIRS:
                    stack.append((entry.path, f"{prefix}{entry.name}/"))
            elif not (entry.is_symlink() and entry.is_dir()):
                found.append((entry, prefix + entry.name))
    found.sort(key=lambda item: item[1].split("/"))
    return found


def discover(
    sources: Sequence[str | os.PathLike[str]],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    stats: CorpusStats | None = None,
) -> list[SourceFile]:
    """The files to scan, in source order (each folder sorted by relative path), each file once.

    Files named explicitly must be readable: one matching no ``include`` glob (or, without globs, of an
    unsupported suffix) is an error. Inside folders such files are counted in ``stats`` as unmatched.
    """
    stats = stats if stats is not None else CorpusStats()
    includes, excludes = _compile(include), _compile(exclude)
    found: list[SourceFile] = []
    seen: set[tuple[int, int]] = set()

    def classify(path: str, name: str, rel: str, st: os.stat_result | None, explicit: bool) -> None:
        if st is None or not stat.S_ISREG(st.st_mode):  # a broken link, a socket, ...: nothing to read
            stats.add("seen", 0)
            stats.add("unmatched", 0)
            return
        if (st.st_dev, st.st_ino) in seen:  # the same file through a nested or repeated source
            return
        seen.add((st.st_dev, st.st_ino))
        stats.add("seen", st.st_size)
        if _matches(excludes, name, rel):
            stats.add("excluded", st.st_size)
            return
        if include:
            kind = "text" if _matches(includes, name, rel) else None
        else:
            kind = _KIND_BY_SUFFIX.get(os.path.splitext(name)[1])
        if kind is None:
            if explicit:
                wanted = f"no --include glob of {list(include)}" if include else f"none of {SUPPORTED_SUFFIXES}"
                raise ValueError(f"unsupported source {path}: it matches {wanted}")
            stats.add("unmatched", st.st_size)
            return
        found.append(SourceFile(Path(path), rel, kind, st.st_size, st.st_mtime_ns))

    def stat_of(entry: os.DirEntry[str] | Path) -> os.stat_result | None:
        try:
            return entry.stat()
        except FileNotFoundError:  # a broken link
            return None
        except OSError as err:
            raise OSError(f"cannot read {entry}: {err.strerror or err}") from err

    for raw in sources:
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            for entry, rel in _walk(str(path)):
                classify(entry.path, entry.name, rel, stat_of(entry), explicit=False)
        elif path.exists():
            classify(str(path), path.name, path.name, stat_of(path), explicit=True)
        else:
            raise FileNotFoundError(f"source {Path(raw).expanduser()} does not exist")
    if not found:
        what = f"matching {list(include)}" if include else f"of type {'/'.join(SUPPORTED_SUFFIXES)}"
        counts = stats.as_dict()["files"]
        raise ValueError(
            f"no files {what} found in {[str(s) for s in sources]} ({counts['seen']} seen, "
            f"{counts['excluded']} excluded, {counts['unmatched']} unmatched)"
        )
    return found


class BadFileError(ValueError):
    """A file that is binary or not UTF-8 (``kind`` is ``"binary"`` or ``"non_utf8"``)."""

    def __init__(self, path: Path, kind: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.kind = kind


def decode_text(data: bytes, path: Path) -> str:
    """``data`` as UTF-8 text; a NUL byte or an invalid byte raises :class:`BadFileError` naming the file."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise BadFileError(path, "binary", f"binary file (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadFileError(path, "non_utf8", f"not UTF-8 (invalid byte at offset {err.start})") from None


def text_field_value(value: Any, path: Path, where: str, text_field: str) -> str:
    """``value`` if it is a string, else an error naming the file and record."""
    if not isinstance(value, str):
        raise ValueError(f"{path} {where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def jsonl_texts(path: Path, text_field: str, digest: Any = None) -> Iterator[tuple[int, str]]:
    """(line number, document text) of every non-blank line, read line by line.

    A line with a NUL byte or one that is not UTF-8 raises :class:`BadFileError`; a malformed record fails
    naming file and line. ``digest`` (a ``hashlib`` object), if given, is fed every byte of the file.
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            if b"\0" in raw:
                raise BadFileError(path, "binary", f"binary file (NUL byte on line {line_no})")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadFileError(path, "non_utf8", f"not UTF-8 (line {line_no}, byte {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path} line {line_no}: no field {text_field!r} (set text_field)")
            yield line_no, text_field_value(record[text_field], path, f"line {line_no}", text_field)


def open_parquet(path: Path, text_field: str) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` with a ``text_field`` column; unreadable files fail naming the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} among {names} (set text_field)")
    return parquet


def parquet_texts(path: Path, text_field: str) -> Iterable[str]:
    """The ``text_field`` value of every row; a damaged file fails naming the file."""
    parquet = open_parquet(path, text_field)
    row = 0
    batches = parquet.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: cannot read rows from {row} on ({type(err).__name__}: {err})") from None
        for value in batch.column(0).to_pylist():
            yield text_field_value(value, path, f"row {row}", text_field)
            row += 1


def _file_sha256(path: Path) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest


def _scan_one(source: SourceFile, text_field: str) -> tuple[str, np.ndarray]:
    """(sha256 of the bytes, UTF-8 size of each document); raises BadFileError for binary/non-UTF-8 files.

    A text file is read whole (it is one document); jsonl and parquet files are streamed.
    """
    path = source.path
    try:
        if source.kind == "jsonl":
            digest = hashlib.sha256()
            sizes = [len(t.encode("utf-8")) for _, t in jsonl_texts(path, text_field, digest)]
        elif source.kind == "parquet":
            digest = _file_sha256(path)
            sizes = [len(t.encode("utf-8")) for t in parquet_texts(path, text_field)]
        else:
            data = path.read_bytes()
            digest = hashlib.sha256(data)
            decode_text(data, path)
            sizes = [len(data)] if data else []
    except OSError as err:
        raise OSError(f"cannot read {path}: {err.strerror or err}") from err
    return digest.hexdigest(), np.asarray(sizes, dtype=np.int64)


def scan(
    files: Sequence[SourceFile],
    text_field: str,
    on_bad_file: str,
    stats: CorpusStats,
    verbose: bool = True,
) -> list[ScannedFile]:
    """Read every file once: skip (or fail on) bad files, drop empty ones and duplicates; return the rest."""
    from tqdm.auto import tqdm

    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")

    def work(source: SourceFile) -> tuple[str, np.ndarray] | BadFileError:
        try:
            return _scan_one(source, text_field)
        except BadFileError as err:
            return err

    kept: list[ScannedFile] = []
    digests: set[str] = set()
    bad_examples: list[str] = []
    pool = ThreadPoolExecutor(_SCAN_THREADS)
    try:
        results = pool.map(work, files)
        for source, result in tqdm(
            zip(files, results), total=len(files), desc="scanning", unit="file", disable=not verbose
        ):
            if isinstance(result, BadFileError):
                if on_bad_file == "fail":
                    raise ValueError(f"{result} (pass --on_bad_file skip to skip such files)")
                stats.add(result.kind, source.size)
                if len(bad_examples) < 3:
                    bad_examples.append(str(result))
                continue
            digest, doc_bytes = result
            if doc_bytes.size == 0:
                stats.add("empty", source.size)
            elif digest in digests:
                stats.add("duplicates", source.size)
            else:
                digests.add(digest)
                kept.append(ScannedFile(source, doc_bytes))
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, the files not read yet are not read
    if bad_examples and verbose:
        counts = stats.as_dict()["files"]
        logger.warning(
            "skipped %d binary and %d non-UTF-8 files, e.g. %s",
            counts["binary"],
            counts["non_utf8"],
            "; ".join(bad_examples),
        )
    return kept


def discover_sources(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """Files to tokenise: the given files plus every supported file under the given folders, sorted per folder."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [source.path for source in discover(list(paths))]


def iter_documents(
    path: Path, text_field: str = "text", keep: np.ndarray | None = None, kind: str | None = None
) -> Iterator[str]:
    """Texts of the documents of ``path`` in file order, restricted to those where ``keep`` (bool, (N,)) is set.

    ``kind`` is ``"text"`` (the file is one document), ``"jsonl"`` or ``"parquet"``; by default it follows the
    suffix. Files must be UTF-8: anything else fails naming the file (nothing is replaced silently).
    """
    path = Path(path)
    kind = kind or _KIND_BY_SUFFIX.get(path.suffix)
    if kind is None:
        raise ValueError(f"unsupported source {path}: expected one of {SUPPORTED_SUFFIXES}")
    if kind == "parquet":
        texts: Iterator[str] = iter(parquet_texts(path, text_field))
    elif kind == "jsonl":
        texts = (text for _, text in jsonl_texts(path, text_field))
    else:
        texts = iter([decode_text(path.read_bytes(), path)])
    for row, text in enumerate(texts):
        if keep is None or keep[row]:
            yield text

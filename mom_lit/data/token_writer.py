"""Token chunks on disk: the tokenising work of one split (its files grouped into tasks) and the two ways of
writing it with litdata.

``TokenizeWork`` turns a task (a group of files) into one token tensor per document, ended by EOS. It is written
either in this process (litdata's chunk writer fed directly) or by ``litdata.optimize`` in worker processes, whose
changes to the calling process (start method, signal handler, environment, a shared cache folder, an
advertisement on stdout) are undone or filtered.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mom_lit.data.sources import ScannedFile, iter_documents
from mom_lit.data.tokenizers import ByteTokenizer, Tokenizer

TMP_PREFIX = ".tmp-"
_ENCODE_BATCH = 256  # documents per encode_batch call
TASK_BYTES = 4 << 20  # text bytes per tokenising task: files are grouped up to this
TASK_FILES = 1024

# One tokenising task: consecutive (file, how to read it, which of its documents to keep (N,) bool).
Task = list[tuple[Path, str, np.ndarray]]


def group_tasks(files: list[ScannedFile], keeps: list[np.ndarray], workers: int) -> tuple[list[Task], list[int]]:
    """Consecutive files with kept documents grouped into tasks; their text bytes.

    A task holds about ``TASK_BYTES``, less when that would leave fewer than four tasks per worker.
    """
    total = sum(int(f.doc_bytes[k].sum()) for f, k in zip(files, keeps))
    target = max(1, min(TASK_BYTES, total // (4 * max(1, workers))))
    tasks: list[Task] = []
    sizes: list[int] = []
    current: Task = []
    size = 0
    for file, keep in zip(files, keeps):
        if not keep.any():
            continue
        current.append((file.source.path, file.source.kind, keep))
        size += int(file.doc_bytes[keep].sum())
        if size >= target or len(current) >= TASK_FILES:
            tasks.append(current)
            sizes.append(size)
            current, size = [], 0
    if current:
        tasks.append(current)
        sizes.append(size)
    return tasks, sizes


def token_dtype(vocab_size: int) -> torch.dtype:
    """Narrowest stored integer type for ``vocab_size`` ids."""
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


class TokenizeWork:
    """The per-item function run by litdata workers: tokenise one task (a group of files) of one split.

    ``item`` is an index into ``self.work``; passing indices (not paths) keeps litdata from treating the
    inputs as files to download.
    """

    def __init__(self, tokenizer: Tokenizer, work: list[Task], text_field: str, dtype: torch.dtype) -> None:
        self.tokenizer = tokenizer
        self.work = work
        self.text_field = text_field
        self.dtype = dtype

    def _batches(self, item: int) -> Iterator[list[str]]:
        """The task's non-empty documents in order, in lists of ``_ENCODE_BATCH``."""
        texts: list[str] = []
        for path, kind, keep in self.work[item]:
            for text in iter_documents(path, self.text_field, keep, kind):
                if not text:
                    continue  # an empty document would only add a lone EOS
                texts.append(text)
                if len(texts) == _ENCODE_BATCH:
                    yield texts
                    texts = []
        if texts:
            yield texts

    def _tensors(self, batch: list[list[int]]) -> Iterator[torch.Tensor]:
        np_dtype = np.uint16 if self.dtype == torch.uint16 else np.int32
        for ids in batch:
            ids.append(self.tokenizer.eos_id)
            yield torch.from_numpy(np.array(ids, dtype=np_dtype))  # numpy converts a list of ints ~4x faster

    def __call__(self, item: int) -> Iterator[torch.Tensor]:
        if isinstance(self.tokenizer, ByteTokenizer):
            for texts in self._batches(item):
                for text in texts:
                    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
                    yield torch.from_numpy(np.append(data.astype(np.int32), self.tokenizer.eos_id)).to(self.dtype)
            return
        # A Hugging Face tokeniser encodes a batch on all cores without the GIL: the next batch is encoded in
        # the background while this thread reads files and hands the previous one to the writer.
        with ThreadPoolExecutor(1) as pool:
            pending: Future[list[list[int]]] | None = None
            for texts in self._batches(item):
                submitted = pool.submit(self.tokenizer.encode_batch, texts)
                if pending is not None:
                    yield from self._tensors(pending.result())
                pending = submitted
            if pending is not None:
                yield from self._tensors(pending.result())


class _DropVendorLines(io.TextIOBase):
    """A stdout that forwards every line but litdata's account advertisement (printed by every ``optimize``
    outside Lightning's hosted studios, with no option to turn it off)."""

    PREFIX = "Create an account on https://lightning.ai/"

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not line.startswith(self.PREFIX):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        # A partial line is held until its newline (or the end), so the advertisement is never split in two.
        self.stream.flush()

    def close_out(self) -> None:
        if self.pending and not self.pending.startswith(self.PREFIX):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


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
    stdout = _DropVendorLines(sys.stdout)
    try:
        with contextlib.redirect_stdout(stdout):
            yield
    finally:
        stdout.close_out()
        for key in [k for k in os.environ if k.startswith("DATA_OPTIMIZER_")]:
            del os.environ[key]
        os.environ.update(saved_env)
        multiprocessing.set_start_method(saved_method, force=True)
        if main_thread and saved_sigint is not None:
            signal.signal(signal.SIGINT, saved_sigint)
        shutil.rmtree(cache_root, ignore_errors=True)


def write_in_process(tmp: Path, fn: TokenizeWork, chunk_tokens: int, split: str, verbose: bool) -> None:
    """The single-process path: litdata's chunk writer fed directly, no worker process to start."""
    from litdata import TokensLoader
    from litdata.streaming.writer import BinaryWriter
    from tqdm.auto import tqdm

    tmp.mkdir(parents=True)
    writer = BinaryWriter(str(tmp), chunk_size=chunk_tokens, item_loader=TokensLoader())
    written = 0
    for item in tqdm(range(len(fn.work)), desc=f"tokenising {split}", unit="task", disable=not verbose):
        for tokens in fn(item):
            writer[written] = tokens
            written += 1
    if written:
        writer.done()
        writer.merge()
    else:
        (tmp / "index.json").write_text(json.dumps({"chunks": [], "config": None}))


def write_with_optimize(
    tmp: Path, fn: TokenizeWork, weights: list[int], chunk_tokens: int, workers: int, verbose: bool
) -> None:
    """The multi-process path: ``litdata.optimize`` with one task (a group of files) per item."""
    from litdata import TokensLoader, optimize

    with _isolated_optimize(tmp.parent / f"{TMP_PREFIX}litdata-{uuid.uuid4().hex[:8]}"):
        optimize(
            fn=fn,
            inputs=list(range(len(fn.work))),
            output_dir=str(tmp),
            weights=weights,
            chunk_size=chunk_tokens,
            item_loader=TokensLoader(),
            num_workers=workers,
            reorder_files=False,
            keep_data_ordered=True,  # a static assignment of tasks to workers: reproducible chunks
            start_method="spawn",
            verbose=verbose,
        )

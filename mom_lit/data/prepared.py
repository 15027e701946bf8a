"""A prepared data folder as its readers see it: the split folders, each with its ``mom_lit_meta.json``, and the
``tokenizer.json`` they record (written by :func:`mom_lit.data.prepare.prepare_dataset`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mom_lit.data import remote

__all__ = ["FORMAT", "META_FILENAME", "SPLITS", "TOKENIZER_FILENAME", "read_meta", "recorded_tokenizer", "summarize"]

META_FILENAME = "mom_lit_meta.json"
TOKENIZER_FILENAME = "tokenizer.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT = "mom_lit.tokens/2"


def read_meta(split_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``mom_lit_meta.json`` of a prepared split folder (a local path or a URL)."""
    path = remote.join(split_dir, META_FILENAME)  # split_dir may be a URL
    if not remote.isfile(path):
        raise FileNotFoundError(f"{path} not found: {split_dir} is not a split prepared by mom_lit")
    return json.loads(remote.read_text(path))


def recorded_tokenizer(data_dir: str | os.PathLike[str]) -> str:
    """The tokeniser spec the data in ``data_dir`` (a folder or a URL) were prepared with.

    The ``tokenizer.json`` recorded in the first split's metadata, else ``"byte"`` (also for data prepared
    before tokeniser files were recorded: loading then names the mismatch with the recorded fingerprint).
    """
    root = data_dir if remote.is_url(data_dir) else Path(data_dir).expanduser()
    for split in SPLITS:
        if remote.isfile(remote.join(root, split, META_FILENAME)):
            record = read_meta(remote.join(root, split)).get("tokenizer_file")
            if record and remote.is_url(root):
                raise ValueError(f"data_dir {data_dir} records the tokenizer file {record['path']!r}, which is not "
                                 "read from a URL: pass the tokenizer (a local tokenizer.json or a hub name)")
            return str((root / record["path"]).resolve()) if record else "byte"
    return "byte"


def summarize(metas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A JSON-ready summary of a preparation: file counts, the tokeniser, and per split files/documents/tokens."""
    first = next(iter(metas.values()))
    corpus = first.get("corpus", {})
    return {
        "files": corpus.get("files"),
        "bytes": corpus.get("bytes"),
        "tokenizer": {
            "name": first["tokenizer"],
            "vocab_size": first["vocab_size"],
            "eos_id": first["eos_id"],
            "file": first.get("tokenizer_file"),
        },
        "splits": {
            split: {
                "files": meta.get("num_files"),
                "documents": meta["num_documents"],
                "bytes": meta.get("num_bytes"),
                "tokens": meta["num_tokens"],
            }
            for split, meta in metas.items()
        },
    }

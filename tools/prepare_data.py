#!/usr/bin/env python
"""Tokenise local .txt / .jsonl / .parquet files into litdata token chunks for ``TextDataModule``.

Example::

    python tools/prepare_data.py data/raw/ --output_dir data/prepared --tokenizer byte \\
        --val_fraction 0.01 --num_workers 8

writes ``data/prepared/{train,val}/`` (chunks, ``index.json``, ``mom_lit_meta.json``). Re-running with the
same arguments skips the splits that are already complete; see ``mom_lit.data.prepare`` for the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mom_lit.data.prepare import SUPPORTED_SUFFIXES, prepare_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help=f"files ({', '.join(SUPPORTED_SUFFIXES)}) or folders of them")
    parser.add_argument("-o", "--output_dir", required=True, help="folder that receives the split folders")
    parser.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json path or a cached hub name")
    parser.add_argument("--eos_token", default=None, help="end-of-document token of a tokenizer.json without one")
    parser.add_argument("--text_field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for validation")
    parser.add_argument("--test_fraction", type=float, default=0.0, help="share of documents for test")
    parser.add_argument("--seed", type=int, default=42, help="seed of the document-to-split assignment")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenising processes, one source file per task (0 or 1: in this process)",
    )
    parser.add_argument("--chunk_tokens", type=int, default=1 << 23, help="tokens per litdata chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace splits prepared with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    metas = prepare_dataset(
        args.sources,
        args.output_dir,
        args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        num_workers=args.num_workers,
        chunk_tokens=args.chunk_tokens,
        eos_token=args.eos_token,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    fields = ("num_documents", "num_tokens", "tokenizer", "vocab_size")
    summary = {split: {k: meta[k] for k in fields} for split, meta in metas.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

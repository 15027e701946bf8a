"""``mom-lit prepare``: tokenise local files into litdata token chunks for ``TextDataModule``.

Examples::

    # .txt / .jsonl / .parquet files, byte tokenizer
    mom-lit prepare data/raw/ --output_dir data/prepared --tokenizer byte --val_fraction 0.01

    # this Python's standard library and site-packages as a code corpus, with a 16K BPE trained on it
    mom-lit prepare --python_library --include '*.py' --include '*.md' --include '*.rst' \\
        --train_bpe 16384 -o data/code --val_fraction 0.005 --seed 0

writes ``OUT/{train,val}/`` (chunks, ``index.json``, ``mom_lit_meta.json``) and, for a Hugging Face tokenizer,
``OUT/tokenizer.json``, then prints a JSON summary (files seen, kept, skipped and why; tokens per split).
``--include`` globs (on the file name or its path relative to the folder) read matching files of any suffix as
one plain-text document each. Binary and non-UTF-8 files are skipped and counted by default (``--on_bad_file
fail`` stops at the first, naming it); identical files are kept once. Re-running with the same arguments skips
the splits that are already complete; a failed run exits with status 1, a one-line message naming the bad input,
and leaves nothing behind. See ``mom_lit.data.prepare`` for the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mom_lit.data.prepare import SUPPORTED_SUFFIXES, prepare_dataset, summarize
from mom_lit.data.sources import BAD_FILE_POLICIES


PROG = "mom-lit prepare"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "sources", nargs="*", help=f"files ({', '.join(SUPPORTED_SUFFIXES)}, or matching --include) or folders"
    )
    parser.add_argument("-o", "--output_dir", required=True, help="folder that receives the split folders")
    parser.add_argument(
        "--python_library",
        action="store_true",
        help="add this interpreter's standard library and site-packages folders to the sources",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="read files matching GLOB (name or relative path) as plain-text documents; repeatable",
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="never read files matching GLOB; repeatable"
    )
    parser.add_argument(
        "--on_bad_file",
        choices=BAD_FILE_POLICIES,
        default="skip",
        help="binary or non-UTF-8 files: skip them (counted in the summary; the default) or fail naming the file",
    )
    parser.add_argument("--max_files", type=int, default=None, help="keep at most N files after dedup (seeded)")
    parser.add_argument(
        "--tokenizer", default=None, help="'byte' (default), a tokenizer.json path or a cached hub name"
    )
    parser.add_argument(
        "--train_bpe", type=int, default=None, metavar="V", help="train a byte-level BPE of vocabulary V on train"
    )
    parser.add_argument(
        "--bpe_sample_mb", type=float, default=64.0, help="train the BPE on a seeded sample of this many MB of train"
    )
    parser.add_argument("--eos_token", default=None, help="end-of-document token of a tokenizer.json without one")
    parser.add_argument("--text_field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for validation")
    parser.add_argument("--test_fraction", type=float, default=0.0, help="share of documents for test")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split, the file cap and the BPE sample")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="tokenising processes, a group of files per task (0 or 1: in this process; a Hugging Face "
        "tokenizer already encodes each batch on all cores)",
    )
    parser.add_argument("--chunk_tokens", type=int, default=1 << 23, help="tokens per litdata chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace splits prepared with other settings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.sources and not args.python_library:
        parser.error("name files or folders to read, or pass --python_library")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
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
            include=args.include,
            exclude=args.exclude,
            python_library=args.python_library,
            on_bad_file=args.on_bad_file,
            max_files=args.max_files,
            train_bpe=args.train_bpe,
            bpe_sample_mb=args.bpe_sample_mb,
        )
    except (ValueError, OSError, ImportError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    print(json.dumps({"output_dir": os.path.abspath(args.output_dir), **summarize(metas)}, indent=2))
    return 0

#!/usr/bin/env python
"""Kept for existing scripts: the same as ``mom-lit evaluate length`` (see :mod:`mom_lit.eval.length_cli`)."""

from mom_lit.eval.length_cli import build_parser, main, split_documents  # noqa: F401  (for importers)

if __name__ == "__main__":
    main(prog="tools/eval_length.py")

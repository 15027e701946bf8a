#!/usr/bin/env python
"""Kept for existing scripts: the same as ``mom-lit prepare`` (see :mod:`mom_lit.data.prepare_cli`)."""

import sys

from mom_lit.data.prepare_cli import build_parser, main  # noqa: F401  (build_parser: for importers)

if __name__ == "__main__":
    sys.exit(main(prog="tools/prepare_data.py"))

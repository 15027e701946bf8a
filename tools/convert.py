#!/usr/bin/env python
"""Kept for existing scripts: the same as ``mom-lit convert`` (see :mod:`mom_lit.interop.convert_cli`)."""

import sys

from mom_lit.interop.convert_cli import build_parser, convert, main  # noqa: F401  (for importers)

if __name__ == "__main__":
    sys.exit(main(prog="tools/convert.py"))

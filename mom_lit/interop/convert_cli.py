"""``mom-lit convert``: convert MoM checkpoints between a Lightning ``.ckpt``, a mom_lit directory and
flash-linear-attention (fla).

Examples::

    # Lightning checkpoint -> mom_lit directory (config.json + model.safetensors), the input of generation
    mom-lit convert runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart

    # fla MomForCausalLM / GatedDeltaNetForCausalLM directory -> mom_lit directory
    mom-lit convert path/to/fla_model exported/fla_model

    # any of them -> an fla directory that fla's AutoModelForCausalLM.from_pretrained loads
    mom-lit convert exported/quickstart fla/quickstart --to fla --dtype bfloat16

The source kind is detected: a file is a Lightning checkpoint, a directory is told apart by its config.json
(``model_type`` "mom_lit", "mom" or "gated_deltanet"). ``--to fla`` writes fla's "gated_deltanet" for a
single-memory model (one memory, no router, no shared memory) and "mom" otherwise; ``--to mom`` or
``--to gated_deltanet`` forces the type. A file-based tokenizer travels with the model as tokenizer.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from mom_lit.interop import (FLA_GDN, FLA_MOM, export_lightning_checkpoint, load_checkpoint, save_fla,
                             save_pretrained)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("mom_lit", "fla", FLA_MOM, FLA_GDN)


PROG = "mom-lit convert"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a Lightning .ckpt file, a mom_lit directory or an fla directory")
    parser.add_argument("output_dir", help="directory to write (created; existing files are overwritten)")
    parser.add_argument("--to", choices=TARGETS, default="mom_lit",
                        help="output format: mom_lit (default), fla (type chosen from the model), mom, gated_deltanet")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: as stored)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to record ('byte', a tokenizer.json path or a cached hub name); "
                             "default: the one recorded with the source")
    return parser


def convert(source: str | Path, output_dir: str | Path, to: str = "mom_lit", dtype: torch.dtype | None = None,
            tokenizer: str | None = None) -> Path:
    """Convert ``source`` into ``output_dir`` (see the module docstring). Returns the output directory."""
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    source, output_dir = Path(source).expanduser(), Path(output_dir)
    if not source.exists():
        raise FileNotFoundError(f"source checkpoint {source} does not exist")
    if to == "mom_lit" and source.is_file():
        # Straight from the checkpoint's tensors: no model is built, nothing is re-initialised.
        return export_lightning_checkpoint(source, output_dir, dtype=dtype, tokenizer=tokenizer)
    loaded = load_checkpoint(source, dtype=None)
    tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
    if to == "mom_lit":
        return save_pretrained(loaded.model, output_dir, tokenizer=tokenizer, dtype=dtype)
    out = save_fla(loaded.model, output_dir, model_type=None if to == "fla" else to, dtype=dtype)
    if tokenizer is not None and tokenizer != "byte":
        path = Path(tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if path.is_file() and path.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(path, out / "tokenizer.json")
    return out


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        out = convert(args.source, args.output_dir, args.to, DTYPES.get(args.dtype), args.tokenizer)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0

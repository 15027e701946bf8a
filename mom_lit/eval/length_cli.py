"""``mom-lit evaluate length``: loss and perplexity against position in the context, past the length a model was
trained on.

Every document is cut to its first ``--max-length + 1`` tokens and fed ``--chunk-size`` tokens at a time,
each chunk continuing from the recurrent cache of the previous one, so memory stays constant however long the
context (:func:`mom_lit.eval.position_loss`). The loss of each position is averaged over the documents, then
over buckets of positions that double in width (``[0, 64)``, ``[64, 128)``, ``[128, 256)``, ...). A model that
extrapolates keeps a flat or falling curve past its training length (the dashed line).

Documents: ``--text`` files or folders (``.txt`` = one document, ``.jsonl`` / ``.parquet`` = one per record,
``--text-field``); or ``--split``, a split folder written by ``mom-lit prepare`` (e.g. ``data/pylib/val``:
held-out documents, read as the token ids it stores, cut at its end-of-document token); by default Shakespeare's
plays from the embedded corpus, one play per document (84K to 171K bytes each), so every bucket averages the same
38 documents. Only documents at least ``--max-length + 1`` tokens long are used (so every bucket averages the same
documents), or at least ``--min-length + 1`` tokens, or any with ``--allow-short``: then a bucket averages the
documents that reach it.

Usage::

    mom-lit evaluate length --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt \\
        --max-length 32768 --train-length 256 --out docs/eval_length

writes ``docs/eval_length.png`` (needs matplotlib), ``docs/eval_length.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mom_lit.data.prepare import discover_sources, iter_documents
from mom_lit.data.tokenizers import load_tokenizer
from mom_lit.eval import bucket_edges, position_loss
from mom_lit.interop import load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PROG = "mom-lit evaluate length"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="Lightning .ckpt, mom_lit or fla checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the checkpoint's, else byte)")
    parser.add_argument("--text", nargs="+", default=None,
                        help=".txt/.jsonl/.parquet files or folders (default: Shakespeare's plays)")
    parser.add_argument("--text-field", default="text", help="field of a .jsonl/.parquet record holding the text")
    parser.add_argument("--split", default=None,
                        help="a split folder prepared by mom-lit prepare (its token ids; instead of --text)")
    parser.add_argument("--max-length", type=int, default=8192, help="context length evaluated, in tokens")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward pass")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per batch")
    parser.add_argument("--max-docs", type=int, default=None, help="use at most this many documents")
    parser.add_argument("--allow-short", action="store_true",
                        help="also use documents shorter than --max-length + 1 tokens")
    parser.add_argument("--min-length", type=int, default=None,
                        help="use documents of at least this many + 1 tokens (default: --max-length)")
    parser.add_argument("--first-bucket", type=int, default=64, help="width of the first bucket of positions")
    parser.add_argument("--train-length", type=int, default=None, help="training context length, marked on the plot")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype")
    parser.add_argument("--backend", default=None, help="scan backend (default: auto on cuda, eager on cpu)")
    parser.add_argument("--out", default=None, help="output path stem: writes STEM.json and STEM.png")
    parser.add_argument("--title", default=None, help="plot title (default: the checkpoint's name)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="redraw the plot of a JSON this script wrote (to --out, default beside it); no evaluation")
    return parser


def _documents(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.text:
        sources = discover_sources(args.text)
        texts = [t for path in sources for t in iter_documents(path, args.text_field)]
        return texts, ", ".join(str(p) for p in args.text)
    from mom_lit.data.shakespeare import play_scenes

    plays: dict[str, list[str]] = {}
    for scene in play_scenes():
        plays.setdefault(scene.play, []).append(scene.text)
    return ["\n".join(scenes) for scenes in plays.values()], "Shakespeare's plays (one document each)"


def split_documents(split_dir: str | Path, eos_id: int) -> list[list[int]]:
    """The token ids of a prepared split's documents, in stored order, cut after each end-of-document token (the
    EOS is kept, as in training). Stored tokens past the last full block of 1024 are not read."""
    from litdata import StreamingDataset, TokensLoader

    from mom_lit.data.prepare import read_meta

    read_meta(split_dir)  # a clear error for a folder that is not a prepared split
    dataset = StreamingDataset(input_dir=str(Path(split_dir).resolve()), item_loader=TokensLoader(block_size=1024),
                               shuffle=False, drop_last=False)
    stream = torch.cat([dataset[i] for i in range(len(dataset))]).tolist() if len(dataset) else []
    docs, start = [], 0
    for i, token in enumerate(stream):
        if token == eos_id:
            docs.append(stream[start:i + 1])
            start = i + 1
    if start < len(stream):
        docs.append(stream[start:])
    return docs


def _plot(rows: list[dict], path: Path, title: str, train_length: int | None, note: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise SystemExit(f"the plot needs matplotlib (pip install matplotlib): {error}")
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    x = [r["stop"] for r in rows]
    ax.plot(x, [r["loss"] for r in rows], marker="o", label="mean loss of the positions in each bucket")
    if train_length is not None:
        ax.axvline(train_length, color="grey", linestyle="--", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in x], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(0, 1.15 * max(r["loss"] for r in rows if math.isfinite(r["loss"])))  # from 0: drift to scale
    ax.set_xlabel("position in the context (upper edge of the bucket, tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    lines = textwrap.wrap(note, width=int(fig.get_figwidth() * 19))
    for i, line in enumerate(lines):
        fig.text(0.01, 0.01 + 0.03 * (len(lines) - 1 - i), line, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.01 + 0.03 * len(lines), 1, 1))
    fig.savefig(path)


def _setting(meta: dict) -> str:
    return (f"{meta['documents']} documents from {meta['source']}; tokenizer {meta['tokenizer']}; {meta['device']} "
            f"{meta['dtype']}; chunks of {meta['chunk_size']} on the recurrent cache; {meta['tokens_scored']} tokens "
            f"in {meta['seconds']:.0f} s")


def _write(rows: list[dict], meta: dict, out: Path, title: str | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "buckets": rows}, indent=2) + "\n")
    title = title or f"Loss against context position: {Path(meta['checkpoint']).name}"
    _plot(rows, out.with_suffix(".png"), title, meta["train_length"], _setting(meta))


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> list[dict]:
    """Run the command on ``argv`` (default: ``sys.argv[1:]``); returns the buckets' rows."""
    args = build_parser(prog).parse_args(argv)
    if args.replot is not None:
        saved = json.loads(Path(args.replot).read_text())
        _write(saved["buckets"], saved["meta"], Path(args.out or args.replot), args.title)
        return saved["buckets"]
    if args.checkpoint is None:
        raise SystemExit("--checkpoint is required (or --replot JSON)")
    if args.max_length < 2 or args.chunk_size < 1 or args.batch_size < 1 or args.first_bucket < 1:
        raise SystemExit("--max-length must be >= 2; --chunk-size, --batch-size, --first-bucket >= 1")
    if args.min_length is not None and not 1 <= args.min_length <= args.max_length:
        raise SystemExit(f"--min-length must lie in [1, --max-length={args.max_length}], got {args.min_length}")
    device = torch.device(args.device)
    loaded = load_checkpoint(args.checkpoint, dtype=DTYPES[args.dtype], device=device)
    model = loaded.model.eval()
    model.configure_paths(backend=args.backend or ("auto" if device.type == "cuda" else "eager"))
    tokenizer = load_tokenizer(args.tokenizer or loaded.tokenizer or "byte")
    if args.split is not None:
        if args.text:
            raise SystemExit("pass --text or --split, not both")
        docs, source = split_documents(args.split, tokenizer.eos_id), f"prepared split {args.split}"
    else:
        texts, source = _documents(args)
        docs = [tokenizer.encode(t) for t in texts]
    min_length = 1 if args.allow_short else (args.max_length if args.min_length is None else args.min_length)
    docs = [d for d in docs if len(d) > min_length]
    docs = docs[:args.max_docs] if args.max_docs is not None else docs
    if not docs:
        raise SystemExit(f"no document has {min_length + 1} tokens: lower --max-length / --min-length or pass "
                         "--allow-short")
    top = max(max(d) for d in docs)
    if top >= loaded.config.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer.name!r} gives id {top} beyond the model's vocab_size "
                         f"{loaded.config.vocab_size}: pass the tokenizer the model was trained with")

    start = time.perf_counter()
    result = position_loss(model, docs, args.max_length, args.chunk_size, args.batch_size)
    seconds = time.perf_counter() - start
    edges = bucket_edges(args.max_length, args.first_bucket)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        loss, tokens = result.bucket(lo, hi)
        rows.append({"start": lo, "stop": hi, "loss": loss, "ppl": math.exp(loss), "tokens": tokens})

    meta = {"checkpoint": str(args.checkpoint), "max_length": args.max_length, "chunk_size": args.chunk_size,
            "train_length": args.train_length, "documents": len(docs), "min_length": min_length, "source": source,
            "tokenizer": tokenizer.name,
            "device": device.type, "dtype": args.dtype, "tokens_scored": int(result.count.sum()), "seconds": seconds}
    print("| positions | loss (nats/token) | perplexity | tokens |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['start']}-{r['stop']} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['tokens']} |")
    print(_setting(meta), file=sys.stderr)
    if args.out is not None:
        _write(rows, meta, Path(args.out), args.title)
    return rows

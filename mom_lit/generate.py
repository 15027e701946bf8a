"""``mom-lit generate``: sample text from a trained MoM model, streaming it to the terminal.

::

    mom-lit generate --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt \\
        --prompt "ROMEO:" --max_new_tokens 200 --temperature 0.8 --top_k 50 --seed 0

``--checkpoint`` is a Lightning ``.ckpt`` of the training module, a directory written by ``mom-lit convert``
(mom_lit format) or an fla ``MomForCausalLM`` / ``GatedDeltaNetForCausalLM`` directory. The tokenizer is the one
recorded with the checkpoint (the data module's ``tokenizer`` in a Lightning checkpoint, the ``tokenizer`` entry
of a mom_lit directory, a ``tokenizer.json`` beside fla weights), else ``"byte"``; ``--tokenizer`` overrides it.

The prompt is consumed in one forward pass; every new token then costs one O(1) recurrent step on the model's
cache. Several ``--prompt`` values run one after the other, each streamed as it is produced. With ``--batch``
they run together as one batch instead: prompts of different lengths are packed into one row with document
boundaries (no padding), then decoded as independent sequences, and each completion is printed when all are done.
An empty prompt starts from the end-of-document token, i.e. a fresh document. Generation of a sequence stops
at the end-of-document token unless ``--ignore_eos``. Timings (tokens/s of prefill and decoding) go to stderr.
On a GPU, ``--cuda_graph`` captures the per-token step once as a CUDA graph and replays it for every token.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import torch

from mom_lit.config import BACKENDS
from mom_lit.cuda_graphs import capture_cuda_graph
from mom_lit.data.tokenizers import Tokenizer, TokenizerNotFoundError, load_tokenizer
from mom_lit.model import MoMForCausalLM, check_sampling_args, sample_next

__all__ = ["CapturedStep", "TextStream", "build_parser", "main", "sample_tokens"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONTEXT_TOKENS = 4  # prompt tokens kept as decoding context: some tokenizers spell a token by what precedes it
_MAX_PENDING = 8  # longer than any UTF-8 character: an undecodable run is shown (as U+FFFD) after this many


class TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Each call to :meth:`put` decodes the ids since the last emitted piece together with that piece (its context)
    and returns what the new ids added, or ``""`` while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in list(context)[-_CONTEXT_TOKENS:]]
        self.prefix = 0  # start of the context piece
        self.read = len(self.ids)  # end of what has been emitted

    def put(self, token: int) -> str:
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        incomplete = text.endswith("\ufffd") and len(self.ids) - self.read < _MAX_PENDING
        if final or (len(text) > len(seen) and not incomplete):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(seen):]
        return ""


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class CapturedStep:
    """The model's per-token step over ``cache`` as one CUDA graph, replayed for every new token.

    Decoding updates the cache in place, so its buffers are static and one capture serves every step: the same
    logits as the eager step, without launching each layer's kernels from Python. The warm-up that capture needs
    runs real steps; the cache is restored afterwards. Valid as long as ``cache`` is the one being decoded.
    """

    def __init__(self, model: MoMForCausalLM, cache, num_sequences: int, warmup: int = 2):
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a model on a CUDA device, got {device}")
        self.token = torch.zeros(num_sequences, 1, dtype=torch.long, device=device)  # (N, 1) static input
        buffers = [t for s in cache.layers for t in (s.memory, s.conv) if t is not None]
        saved = [t.clone() for t in buffers]
        self.graph, logits = capture_cuda_graph(
            lambda: model(self.token, cache=cache, use_cache=True).logits, device, warmup)
        self.logits = logits[:, -1]  # (N, V), static output
        for buffer, value in zip(buffers, saved):  # the warm-up and the capture ran real steps
            buffer.copy_(value)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """(N,) tokens -> (N, V) next-token logits (a static buffer, overwritten by the next call)."""
        self.token.copy_(token[:, None])
        self.graph.replay()
        return self.logits


@torch.no_grad()
def sample_tokens(
    model: MoMForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    timings: dict[str, float] | None = None,
    cuda_graph: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, step by step, the next token of every prompt (None for a sequence that already ended with ``eos_id``).

    The prompts (token id lists, none empty) are prefilled together as packed documents of one row, so their
    lengths may differ; decoding then advances all of them by one recurrent step per yielded list. ``timings``,
    if given, receives ``prefill_s`` and ``decode_s`` (seconds, device-synchronised). ``cuda_graph`` (CUDA only)
    replays every step as one captured CUDA graph (:class:`CapturedStep`): the same tokens, fewer launches.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts[{empty[0]}] is empty: every prompt must hold at least one token (start a fresh "
                         "document with the end-of-document token)")
    device = model.embed.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a model on a CUDA device, got {device}")
    timer = _Timer(device)
    lengths = torch.tensor([len(p) for p in prompts])
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)  # (N+1,)
    packed = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]  # (1, total)
    start = timer.now()
    out = model(packed, cu_seqlens=cu_seqlens, use_cache=True)
    cache, logits = out.cache, out.logits[0, cu_seqlens[1:] - 1]  # (N, V): each prompt's last position
    if timings is not None:
        timings["prefill_s"] = timer.now() - start
        timings["decode_s"] = 0.0
    captured = None
    if cuda_graph and max_new_tokens > 1:
        start = timer.now()
        captured = CapturedStep(model, cache, len(prompts))
        if timings is not None:
            timings["decode_s"] += timer.now() - start  # the capture is part of the decoding time
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        start = timer.now()
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (N,)
        values = token.tolist()
        if timings is not None:
            timings["decode_s"] += timer.now() - start
        yield [None if done else v for v, done in zip(values, finished)]
        if eos_id is not None:
            finished = [done or v == eos_id for v, done in zip(values, finished)]
        if all(finished) or step == max_new_tokens - 1:
            return
        start = timer.now()
        if captured is not None:
            logits = captured(token)
        else:
            out = model(token[:, None], cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
        if timings is not None:
            timings["decode_s"] += timer.now() - start


# Command line ---------------------------------------------------------------------------------------------------
PROG = "mom-lit generate"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="Lightning .ckpt, mom_lit directory (mom-lit convert) or fla checkpoint directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeat for several prompts (default: one empty prompt)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte', a tokenizer.json path or a cached hub name "
                             "(default: the checkpoint's, else byte)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to sample per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=None, help="sample among the smallest set of mass >= p")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: nondeterministic)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="scan backend of the prefill (default: auto on cuda, eager on cpu: no compile wait)")
    parser.add_argument("--batch", action="store_true",
                        help="run all prompts as one batch; completions are printed at the end instead of streamed")
    parser.add_argument("--ignore_eos", action="store_true", help="keep sampling after the end-of-document token")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="replay the per-token step as one captured CUDA graph (CUDA devices only)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p, prefix="--")


def _encode(tokenizer: Tokenizer, texts: Sequence[str], vocab_size: int) -> list[list[int]]:
    prompts = [tokenizer.encode(text) or [tokenizer.eos_id] for text in texts]
    top = max(max(p) for p in prompts)
    if top >= vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name!r} gives id {top}, beyond the model's vocab_size {vocab_size}: "
                         "pass the tokenizer the model was trained with (--tokenizer)")
    return prompts


def _run(model: MoMForCausalLM, tokenizer: Tokenizer, texts: Sequence[str], prompts: Sequence[Sequence[int]],
         args: argparse.Namespace, generator: torch.Generator | None, out: TextIO,
         on_piece: Callable[[int, str], None] | None) -> tuple[int, dict[str, float]]:
    """Generate for ``prompts`` as one batch; stream pieces of row 0 when it is alone. Returns (tokens, timings)."""
    streams = [TextStream(tokenizer, p) for p in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    live = len(prompts) == 1
    if live:
        out.write(texts[0])
        out.flush()
    timings: dict[str, float] = {}
    produced = 0
    eos = None if args.ignore_eos else tokenizer.eos_id
    for step in sample_tokens(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              eos, generator, timings, cuda_graph=args.cuda_graph):
        for row, token in enumerate(step):
            if token is None:
                continue
            produced += 1
            piece = streams[row].put(token)
            if piece:
                pieces[row].append(piece)
                if on_piece is not None:
                    on_piece(row, piece)
                if live:
                    out.write(piece)
                    out.flush()
    for row, stream in enumerate(streams):
        tail = stream.flush()
        if tail:
            pieces[row].append(tail)
            if on_piece is not None:
                on_piece(row, tail)
        if live:
            out.write(tail + "\n")
        else:
            out.write(texts[row] + "".join(pieces[row]) + "\n")
    out.flush()
    return produced, timings


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
         on_piece: Callable[[int, str], None] | None = None, prog: str = PROG) -> int:
    """Run the command; ``on_piece(prompt_index, text)`` sees every streamed piece (used by tests)."""
    from mom_lit.interop import load_checkpoint

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = build_parser(prog).parse_args(argv)
    try:
        _check_args(args)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        if args.cuda_graph and device.type != "cuda":
            raise ValueError(f"--cuda_graph needs a CUDA device, got {device}")
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        loaded = load_checkpoint(args.checkpoint, dtype=dtype, device=device)
        model = loaded.model
        model.configure_paths(backend=args.backend or ("auto" if device.type == "cuda" else "eager"))
        spec = args.tokenizer or loaded.tokenizer or "byte"
        tokenizer = load_tokenizer(spec)
        texts = args.prompt if args.prompt else [""]
        prompts = _encode(tokenizer, texts, loaded.config.vocab_size)
    except (FileNotFoundError, NotADirectoryError, TokenizerNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=err)
        return 2

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    groups = [list(range(len(prompts)))] if args.batch else [[i] for i in range(len(prompts))]
    produced, prefill_s, decode_s = 0, 0.0, 0.0
    for n, group in enumerate(groups):
        if n:
            out.write("\n")
        emit = None if on_piece is None else (lambda row, piece, group=group: on_piece(group[row], piece))
        count, timings = _run(model, tokenizer, [texts[i] for i in group], [prompts[i] for i in group], args,
                              generator, out, emit)
        produced += count
        prefill_s += timings.get("prefill_s", 0.0)
        decode_s += timings.get("decode_s", 0.0)
    prompt_tokens = sum(len(p) for p in prompts)
    dtype_name = str(dtype).removeprefix("torch.")
    setting = f"{loaded.source} checkpoint, tokenizer {tokenizer.name}, {device.type} {dtype_name}"
    print(f"[{setting}] prefill: {prompt_tokens} tokens in {prefill_s:.3f} s "
          f"({prompt_tokens / max(prefill_s, 1e-9):.1f} tokens/s); decode: {produced} tokens in {decode_s:.3f} s "
          f"({produced / max(decode_s, 1e-9):.1f} tokens/s)", file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m mom_lit.generate"))

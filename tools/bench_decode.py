"""Per-token decoding latency after a prefill of C tokens: MoM, single-memory Gated DeltaNet and SDPA attention.

Models (12 layers, hidden 1024, vocab 32000, bf16, batch 1; the decode setting of the reference figures):
  MoM              4 heads x 256, E = 4 memories, top-2, shared memory; its step through the torch reference
                   (``mom_lit.ops.decode.decode_step_reference``, "torch step") and through the Triton kernel
                   ("Triton step")
  GDN              the same layer with one memory (the ``gdn_340m`` shape), Triton step
  SDPA             a Llama-style causal transformer (16 heads x 64, RoPE, SwiGLU of the same width) with a
                   preallocated KV cache, written here: the eager step attends over the filled part of the cache
                   (flash kernel), the graph step over the whole buffer with a mask (static shapes)
Each row: prefill of C tokens (recurrent models in chunks through their cache, SDPA in one causal pass), then
``--warmup`` steps and ``--steps`` timed steps of greedy decoding, device-synchronised, in ms per token. The
"+ CUDA graph" rows capture the whole per-token step (embedding to next token) once and replay it: the MoM cache
is updated in place, so its buffers are static; each captured step is first checked against an eager step from
the same state. Every row runs under ``--row-timeout`` seconds. All rows of one run share the card.

Example (GPU):  python tools/bench_decode.py --plot decode_latency.png --json decode_latency.json
Smoke run (CPU): python tools/bench_decode.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_lit import MoMConfig, MoMForCausalLM  # noqa: E402
from mom_lit.cuda_graphs import capture_cuda_graph  # noqa: E402
from mom_lit.model import SwiGLU  # noqa: E402
from mom_lit.norm import RMSNorm  # noqa: E402

from benchlib import (SDPAAttention, device_name, mean_ms, model_dims, release_cached, sync, table_header,  # noqa: E402
                      table_row)

MOM = dict(num_memories=4, topk=2, shared_memory=True)


# ------------------------------------------------------------------------------------------ SDPA baseline
class AttentionBlock(nn.Module):
    """Pre-norm transformer block: the benchmarks' SDPA attention (rotary positions, KV cache), SwiGLU MLP."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = SDPAAttention(hidden, heads)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, mlp_hidden)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int | None, pos: torch.Tensor | None):
        """x (B, T, D); ``start`` and ``pos`` as :meth:`benchlib.SDPAAttention.forward`."""
        x = x + self.attn(self.attn_norm(x), rope=(cos, sin), cache=(k_cache, v_cache), start=start, pos=pos)
        return x + self.mlp(self.mlp_norm(x))


class AttentionLM(nn.Module):
    """Causal transformer with a preallocated KV cache (L, B, nh, max_len, hd); logits of the last position."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, mlp_hidden: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([AttentionBlock(hidden, heads, mlp_hidden, eps) for _ in range(layers)])
        self.norm = RMSNorm(hidden, eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def allocate(self, batch: int, max_len: int) -> None:
        w = self.embed.weight
        shape = (len(self.blocks), batch, self.heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2, device=w.device).float() / self.head_dim)
        angles = torch.arange(max_len, device=w.device).float()[:, None] * inv_freq  # (max_len, hd/2)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, ids: torch.Tensor, start: int | None = 0, pos: torch.Tensor | None = None) -> torch.Tensor:
        if start is None:
            cos, sin = self.cos[pos], self.sin[pos]
        else:
            cos, sin = self.cos[start:start + ids.shape[1]], self.sin[start:start + ids.shape[1]]
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, self.k_cache[i], self.v_cache[i], start, pos)
        return self.lm_head(self.norm(x[:, -1:]))  # (B, 1, vocab)


# ------------------------------------------------------------------------------------------ decode loops
class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def row_timeout(seconds: int):
    """Raise RowTimeout in the row's Python code once ``seconds`` have passed (checked between operations)."""
    def fire(signum, frame):
        raise RowTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mom_prefill(model: MoMForCausalLM, prompt: torch.Tensor, chunk: int):
    """Cache and next token after ``prompt`` (1, C), fed through the cache in chunks of ``chunk`` tokens."""
    cache = None
    for start in range(0, prompt.shape[1], chunk):
        out = model(prompt[:, start:start + chunk], cache=cache, use_cache=True)
        cache = out.cache
    return cache, out.logits[:, -1:].argmax(-1)


def mom_graph_step(model: MoMForCausalLM, cache, token: torch.Tensor, device: str):
    """Capture one step that reads ``token`` (1, 1) and writes the next greedy token back into it.

    Returns (replay, max |logit difference| of a replay against an eager step from the same state)."""
    snapshot = [(s.memory.clone(), None if s.conv is None else s.conv.clone()) for s in cache.layers]
    start_token = token.clone()

    def restore():
        for s, (memory, conv) in zip(cache.layers, snapshot):
            s.memory.copy_(memory)
            if conv is not None:
                s.conv.copy_(conv)
        token.copy_(start_token)

    eager = model(token, cache=cache, use_cache=True).logits.float()
    restore()

    def step():
        logits = model(token, cache=cache, use_cache=True).logits
        token.copy_(logits[:, -1:].argmax(-1))
        return logits

    graph, logits = capture_cuda_graph(step, warmup=3)
    restore()
    graph.replay()
    sync(device)
    error = (logits.float() - eager).abs().max().item()
    return graph.replay, error


def run_mom(name: str, overrides: dict, args, contexts, rows, torch_step: bool) -> None:
    torch.manual_seed(0)
    # Prefill runs the layer's elementwise stages eagerly: torch.compile's wait would not be part of any number.
    cfg = MoMConfig(**{**model_dims(args.tiny), **MOM, "compile_stages": False, **overrides})
    model = MoMForCausalLM(cfg).to(args.device, torch.bfloat16).eval()
    on_gpu = args.device == "cuda"
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, ctx), device=args.device)
        variants = ["torch step"] if torch_step or not on_gpu else []
        variants += ["Triton step", "Triton step + CUDA graph"] if on_gpu else []
        try:
            with row_timeout(args.row_timeout):
                model.configure_paths(backend="auto" if on_gpu else "eager")  # the prefill: Triton scan on the GPU
                cache, token = mom_prefill(model, prompt, args.prefill_chunk)
        except (RowTimeout, RuntimeError) as error:
            rows.extend(dict(model=f"{name}, {v}", context=ctx, error=f"prefill: {error}"[:120]) for v in variants)
            continue
        for variant in variants:
            row = dict(model=f"{name}, {variant}", context=ctx)
            try:
                with row_timeout(args.row_timeout):
                    # only the step differs
                    model.configure_paths(backend="eager" if variant == "torch step" else "auto")
                    if variant.endswith("CUDA graph"):
                        replay, row["graph_max_abs_logit_diff"] = mom_graph_step(model, cache, token, args.device)
                        row["ms"] = mean_ms(replay, args.device, args.steps, args.warmup)
                    else:
                        def step():
                            nonlocal cache, token
                            out = model(token, cache=cache, use_cache=True)
                            cache, token = out.cache, out.logits[:, -1:].argmax(-1)

                        row["ms"] = mean_ms(step, args.device, args.steps, args.warmup)
            except (RowTimeout, RuntimeError) as error:
                row["error"] = f"{type(error).__name__}: {error}"[:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del cache
        release_cached(args.device)


def run_sdpa(args, contexts, rows) -> None:
    torch.manual_seed(0)
    cfg = MoMConfig(**model_dims(args.tiny), **MOM)
    heads = 2 if args.tiny else 16
    model = AttentionLM(cfg.vocab_size, cfg.hidden_size, cfg.num_layers, heads, cfg.mlp_hidden_size)
    model = model.to(args.device, torch.bfloat16).eval()
    for ctx in contexts:
        variants = ["eager"] + (["CUDA graph (masked full cache)"] if args.device == "cuda" else [])
        for variant in variants:
            row = dict(model=f"SDPA + KV cache, {variant}", context=ctx)
            try:
                with row_timeout(args.row_timeout):
                    max_len = ctx + args.warmup + args.steps + 8  # + capture and check steps
                    model.allocate(1, max_len)
                    prompt = torch.randint(0, cfg.vocab_size, (1, ctx), device=args.device)
                    token = model(prompt, start=0).argmax(-1)  # (1, 1)
                    if variant == "eager":
                        position = ctx

                        def step():
                            nonlocal token, position
                            token = model(token, start=position).argmax(-1)
                            position += 1

                        row["ms"] = mean_ms(step, args.device, args.steps, args.warmup)
                    else:
                        pos = torch.full((1,), ctx, device=args.device)
                        first = token.clone()
                        eager = model(token, start=ctx).float()

                        def step():
                            logits = model(token, start=None, pos=pos)
                            token.copy_(logits.argmax(-1))
                            pos.add_(1)
                            return logits

                        graph, logits = capture_cuda_graph(step, warmup=3)
                        pos.fill_(ctx)  # back to the eager step's state: later positions are masked out
                        token.copy_(first)
                        graph.replay()
                        sync(args.device)
                        row["graph_max_abs_logit_diff"] = (logits.float() - eager).abs().max().item()
                        row["ms"] = mean_ms(graph.replay, args.device, args.steps, args.warmup)
            except (RowTimeout, RuntimeError) as error:
                row["error"] = f"{type(error).__name__}: {error}"[:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
            model.k_cache = model.v_cache = None
            release_cached(args.device)


# ------------------------------------------------------------------------------------------ report
def table(rows, contexts) -> str:
    names = list(dict.fromkeys(r["model"] for r in rows))
    lines = table_header(["model, B = 1, per token", *(f"C = {c:,}" for c in contexts)])
    for name in names:
        cells = []
        for ctx in contexts:
            row = next((r for r in rows if r["model"] == name and r["context"] == ctx), None)
            cells.append("" if row is None else f"{row['ms']:.2f} ms" if "ms" in row else "error")
        lines.append(table_row([name, *cells]))
    return "\n".join(lines)


def plot(rows, path: str, title: str, contexts) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    colors = {"MoM, torch": "tab:blue", "MoM, Triton": "tab:orange", "GDN": "tab:green", "SDPA": "tab:red"}
    fig = Figure(figsize=(9, 4.8))
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["model"] for r in rows):
        points = [(r["context"], r["ms"]) for r in rows if r["model"] == name and "ms" in r]
        if points:
            color = next((c for key, c in colors.items() if name.startswith(key)), None)
            ax.plot(*zip(*points), "--" if "graph" in name else "-", marker="o", color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
    ax.set_xlabel("context C (tokens of prefill)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", default=None, help="comma-separated prefill lengths (default 1K,8K,32K,64K)")
    parser.add_argument("--steps", type=int, default=30, help="timed decoding steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per prefill call of MoM / GDN")
    parser.add_argument("--row-timeout", type=int, default=90, help="seconds per row before it is given up")
    parser.add_argument("--models", default="mom,gdn,sdpa", help="subset of mom,gdn,sdpa")
    parser.add_argument("--tiny", action="store_true", help="debug-size models (smoke run)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--plot", default=None, help="write a PNG of latency against context here")
    args = parser.parse_args(argv)
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    else:
        contexts = [16, 64] if args.tiny else [1024, 8192, 32768, 65536]
    if any(c < 1 for c in contexts) or args.steps < 1 or args.warmup < 0 or args.prefill_chunk < 1:
        parser.error("contexts, --steps and --prefill-chunk must be positive, --warmup >= 0")
    models = set(args.models.split(","))
    if not models <= {"mom", "gdn", "sdpa"}:
        parser.error(f"--models takes mom, gdn, sdpa; got {args.models}")
    card = device_name(args.device)
    print(f"card: {card}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    with torch.no_grad():
        if "mom" in models:
            run_mom("MoM", {}, args, contexts, rows, torch_step=True)
        if "gdn" in models:
            run_mom("GDN", dict(num_memories=1, topk=1, shared_memory=False), args, contexts, rows, torch_step=False)
        if "sdpa" in models:
            run_sdpa(args, contexts, rows)
    print(table(rows, contexts))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, torch=torch.__version__, rows=rows), indent=1))
    if args.plot:
        title = f"12-layer models, bf16, B = 1, {card} (solid: eager loop, dashed: CUDA graph)"
        plot(rows, args.plot, "tiny models" if args.tiny else title, contexts)
    errors = [r for r in rows if "error" in r]
    return 1 if errors and len(errors) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

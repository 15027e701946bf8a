"""Where the GPU memory of one training step of a MoM model goes.

For each model: the memory each block keeps alive after its forward (activations saved for the backward plus its
output), the LM head and loss, the peak of the forward and of the backward, and the saved tensors grouped by
module and shape (``torch.autograd.graph.saved_tensors_hooks``; one storage counted once). Optionally the step
with every block recomputed in the backward (activation checkpointing), timed against the plain step.

Example (GPU): python tools/memory_breakdown.py --models mom,gdn --checkpointing
Smoke run (CPU): python tools/memory_breakdown.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mom_lit import MoMConfig, MoMForCausalLM  # noqa: E402

from benchlib import GIB, bench, checkpoint_blocks, model_dims, peak_memory_gib, release_cached, sync  # noqa: E402


def build(kind: str, tiny: bool, device: str, dtype: torch.dtype) -> MoMForCausalLM:
    dims = model_dims(tiny)
    routing = dict(num_memories=4, topk=2, shared_memory=True) if kind == "mom" else \
        dict(num_memories=1, topk=1, shared_memory=False)
    backend = "triton" if device == "cuda" else "compiled"
    torch.manual_seed(0)
    return MoMForCausalLM(MoMConfig(**dims, **routing, backend=backend, tie_embeddings=False)).to(device, dtype).train()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def saved_tensor_table(model, ids, top: int) -> list[str]:
    """Saved-for-backward bytes grouped by (module path with block index folded, shape, dtype)."""
    where: list[str] = ["<root>"]
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args) -> None:
        where.append(names[module])

    def leave(module, args, output) -> None:
        where.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}  # weights are no activations
    seen, groups, kept = set(), defaultdict(lambda: [0, 0]), []

    def pack(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen and key[0] not in params:
            seen.add(key)
            path = re.sub(r"blocks\.\d+", "blocks.*", where[-1])
            g = groups[(path, tuple(t.shape), str(t.dtype).replace("torch.", ""))]
            g[0] += 1
            g[1] += t.numel() * t.element_size()
        # The graph gets no tensor back: a hook that returns a node's own output makes a cycle (node -> output ->
        # node) that no collector frees. Detached aliases keep every storage alive until the end of the count
        # (so that no freed address is reused and counted twice) and are dropped with ``kept``.
        kept.append(t.detach())
        return 0

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: None):
        loss = model(ids, labels=ids).loss
    for h in hooks:
        h.remove()
    del loss
    kept.clear()
    total = sum(b for _, b in groups.values())
    lines = [f"saved tensors: {total / GIB:.2f} GiB in all (dedup by storage), largest groups:",
             "| module | shape | dtype | count | MiB |", "|---|---|---|---|---|"]
    for (path, shape, dt), (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {path} | {shape} | {dt} | {n} | {b / 2 ** 20:.0f} |")
    return lines


def block_deltas(model, ids, device) -> list[str]:
    """Memory kept alive by each block's forward, the head + loss, and the forward/backward peaks."""
    marks = []
    hooks = [b.register_forward_hook(lambda m, a, o: marks.append(allocated(device))) for b in model.blocks]
    hooks.append(model.norm.register_forward_hook(lambda m, a, o: marks.append(allocated(device))))
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = allocated(device)
    out = model(ids, labels=ids)
    after_fwd = allocated(device)
    peak_fwd = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out.loss.backward()
    peak_bwd = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    for h in hooks:
        h.remove()
    deltas = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return [f"before forward (weights, grads set to None): {start / GIB:.2f} GiB",
            "per block kept after forward (GiB): " + ", ".join(f"{d / GIB:.3f}" for d in deltas[:-1]),
            f"final norm: {deltas[-1] / GIB:.2f} GiB; LM head + loss kept: {(after_fwd - marks[-1]) / GIB:.2f} GiB",
            f"after forward: {after_fwd / GIB:.2f} GiB; peak forward {peak_fwd / GIB:.2f} GiB, "
            f"peak backward {peak_bwd / GIB:.2f} GiB"]


def step_time_and_peak(model, ids, device) -> tuple[float, float]:
    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    if device != "cuda":
        step()
        return float("nan"), float("nan")
    ms = bench(step, device, rep_ms=500)
    sync(device)
    return ms, peak_memory_gib(step, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="mom,gdn", help="comma list of mom (E=4, top-2, shared) and gdn (1 memory)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--checkpointing", action="store_true", help="also time the step with checkpointed blocks")
    args = p.parse_args()
    dtype = torch.bfloat16
    b, t = (2, 64) if args.tiny else (8, 2048)
    for kind in args.models.split(","):
        model = build(kind, args.tiny, args.device, dtype)
        ids = torch.randint(0, model.config.vocab_size, (b, t), device=args.device)
        ms, peak = step_time_and_peak(model, ids, args.device)
        print(f"## {kind}: {b}x{t}, step {ms:.1f} ms, {b * t / ms:.1f} K tok/s, peak {peak:.2f} GiB", flush=True)
        print("\n".join(block_deltas(model, ids, args.device)), flush=True)
        model.zero_grad(set_to_none=True)
        print("\n".join(saved_tensor_table(model, ids, args.top)), flush=True)
        if args.checkpointing:
            checkpoint_blocks(model)
            ms, peak = step_time_and_peak(model, ids, args.device)
            print(f"## {kind} with activation checkpointing: step {ms:.1f} ms, {b * t / ms:.1f} K tok/s, "
                  f"peak {peak:.2f} GiB", flush=True)
        del model
        release_cached(args.device)


if __name__ == "__main__":
    main()

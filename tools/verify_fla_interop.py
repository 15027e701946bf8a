#!/usr/bin/env python
"""Check mom_lit's fla converter against flash-linear-attention itself (a GPU script; fla must be importable).

Builds small random fla ``MomForCausalLM`` and ``GatedDeltaNetForCausalLM`` models, saves them with
``save_pretrained``, imports them with ``mom_lit.interop.load_fla`` and compares, in inference mode
(``eval()``, ``torch.no_grad()``), on random token ids:

* prefill logits at each ``--lengths`` (fla runs its fused-recurrent kernel up to 64 tokens, chunked above),
  in float32 and bfloat16;
* decoding: a prefill of ``--prompt_len`` tokens, then ``--decode_steps`` single-token steps on each side's
  recurrent cache, fed the same (fla's greedy) tokens; the worst step is reported;
* greedy decoding: ``MoMForCausalLM.generate`` against the tokens of fla's step loop, and, as a check of fla
  itself, fla's Hugging Face ``generate`` against the same tokens;
* the other direction: ``mom_lit.interop.save_fla`` of the imported model, reloaded by fla's
  ``from_pretrained``, against the original fla model.

Errors are ``max|diff|`` and the relative RMS ``rms(ours - fla) / rms(fla)``. In bfloat16 the column ``floor``
gives fla-bf16 against fla-fp32, the rounding noise that any bf16 implementation carries. fla's MoM layer
groups tokens by memory with ``argsort``, which is not guaranteed to keep time order inside a memory; the
``mom*`` rows repeat the comparison with that sort made stable (the order the layer assumes), which tells an
ordering effect apart from a conversion error.

Typical run (repository root, fla wheels installed, CUDA)::

    PYTHONPATH=. python tools/verify_fla_interop.py

``--device cpu`` runs fla's Triton kernels under the Triton interpreter (autotuners limited to their first
configuration): slow, for tiny shapes (``--tiny``) up to 64 tokens (fla's chunked kernels do not run in the
interpreter), to check the script itself. The table is printed and, when
the environment variable OUT names a folder, written to ``$OUT/fla_interop.txt`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

TINY = dict(hidden=32, heads=2, head_dim=8, layers=2, memories=4, topk=2, vocab=64, lengths="21,45",
            prompt_len=13, decode_steps=4, batch=2)
FP32_TOL = 5e-3  # relative RMS; Triton matmuls of fp32 inputs may run in tf32 on both sides
BF16_FACTOR, BF16_FLOOR = 2.0, 2e-2  # bf16 passes under max(BF16_FACTOR * noise floor, BF16_FLOOR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter, tiny shapes)")
    parser.add_argument("--tiny", action="store_true", help=f"tiny shapes for the interpreter: {TINY}")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--memories", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", default="37,200", help="comma-separated prefill lengths")
    parser.add_argument("--prompt_len", type=int, default=37)
    parser.add_argument("--decode_steps", type=int, default=16)
    parser.add_argument("--backend", default=None, help="mom_lit scan backend (default: auto on cuda, eager on cpu)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _enable_interpreter() -> None:
    """Run Triton kernels on the CPU; must happen before fla defines its kernels."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.autotuner as autotuner

    # Autotuning benchmarks on a device; the interpreter has none. Keep each kernel's first configuration.
    original = autotuner.Autotuner.__init__

    def first_config_only(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = first_config_only


def _import_fla():
    try:
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, MomConfig, MomForCausalLM
    except Exception as error:  # fla raises more than ImportError when no backend fits this machine
        sys.exit(f"error: cannot import fla ({type(error).__name__}: {error}).\n"
                 "Install flash-linear-attention and its needs (einops, transformers>=5.6) first, e.g. "
                 "pip install --no-deps fla_core-0.6.0-py3-none-any.whl flash_linear_attention-0.6.0-py3-none-any.whl")
    return MomConfig, MomForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM


@contextlib.contextmanager
def fla_stable_sort():
    """Make the token sort inside fla's MoM layer stable (time order kept inside each memory)."""
    import fla.layers.mom as fla_mom

    original_transform, original_argsort = fla_mom.transform, torch.Tensor.argsort

    def stable_argsort(self, *args, **kwargs):
        return original_argsort(self, *args, **{**kwargs, "stable": True})

    def transform(*args, **kwargs):
        torch.Tensor.argsort = stable_argsort
        try:
            return original_transform(*args, **kwargs)
        finally:
            torch.Tensor.argsort = original_argsort

    fla_mom.transform = transform
    try:
        yield
    finally:
        fla_mom.transform = original_transform


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = ours.double() - ref.double()
    rel = diff.pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp(min=1e-30)
    return diff.abs().max().item(), rel.item()


def randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """fla initialises RMSNorm weights to one; random ones make a misplaced norm visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, model: str, dtype: str, check: str, max_abs: float | None, rel_rms: float | None,
            floor: float | None = None, note: str = "") -> None:
        if rel_rms is None:
            verdict = ""
        elif dtype == "float32":
            verdict = "PASS" if rel_rms <= FP32_TOL else "FAIL"
        else:
            verdict = "PASS" if rel_rms <= max(BF16_FACTOR * (floor or 0.0), BF16_FLOOR) else "FAIL"
        self.rows.append(dict(model=model, dtype=dtype, check=check, max_abs=max_abs, rel_rms=rel_rms, floor=floor,
                              verdict=verdict, note=note))
        print(self.format_row(self.rows[-1]), flush=True)

    @staticmethod
    def format_row(r: dict) -> str:
        def num(x):
            return f"{x:.3e}" if isinstance(x, float) else "-"

        return (f"| {r['model']:<16} | {r['dtype']:<8} | {r['check']:<26} | {num(r['max_abs']):>10} | "
                f"{num(r['rel_rms']):>10} | {num(r['floor']):>10} | {r['verdict']:<4} | {r['note']}")

    def table(self) -> str:
        head = (f"| {'model':<16} | {'dtype':<8} | {'check':<26} | {'max|diff|':>10} | {'rel RMS':>10} | "
                f"{'floor':>10} | {'ok':<4} | note")
        return "\n".join([head, "|" + "-" * (len(head) - 1)] + [self.format_row(r) for r in self.rows])


def compare(name, fla_model, ours, args, report: Report, dtype_name: str, fla_fp32=None, stable: bool = False):
    """Prefill, decode and generate comparisons of one (fla, ours) pair in one dtype."""
    device = next(ours.parameters()).device
    sort_ctx = fla_stable_sort if stable else contextlib.nullcontext
    g = torch.Generator().manual_seed(args.seed + 1)
    for length in args.lengths:
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=g).to(device)
        with torch.no_grad(), sort_ctx():
            ref = fla_model(ids).logits.float()
            floor = None
            if fla_fp32 is not None:
                floor = errors(ref, fla_fp32(ids).logits.float())[1]
        with torch.no_grad():
            out = ours(ids).logits.float()
        report.add(name, dtype_name, f"prefill T={length}", *errors(out, ref), floor)

    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).to(device)
    worst = (0.0, 0.0)
    fla_greedy = []  # fla's greedy continuation, one (B, 1) token per step
    try:
        with torch.no_grad(), sort_ctx():
            fla_out = fla_model(prompt, use_cache=True)
            ours_out = ours(prompt, use_cache=True)
            cache, past = ours_out.cache, fla_out.past_key_values
            if fla_fp32 is not None:
                fp32_out = fla_fp32(prompt, use_cache=True)
                fp32_past, floor = fp32_out.past_key_values, 0.0
            else:
                floor = None
            for _ in range(args.decode_steps):
                token = fla_out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                fla_greedy.append(token)
                fla_out = fla_model(token, past_key_values=past, use_cache=True)
                past = fla_out.past_key_values
                ours_out = ours(token, cache=cache, use_cache=True)
                cache = ours_out.cache
                step = errors(ours_out.logits[:, -1].float(), fla_out.logits[:, -1].float())
                worst = (max(worst[0], step[0]), max(worst[1], step[1]))
                if fla_fp32 is not None:
                    fp32_out = fla_fp32(token, past_key_values=fp32_past, use_cache=True)
                    fp32_past = fp32_out.past_key_values
                    floor = max(floor, errors(fla_out.logits[:, -1].float(), fp32_out.logits[:, -1].float())[1])
        report.add(name, dtype_name, f"decode {args.decode_steps} steps (worst)", *worst, floor,
                   note=f"same tokens fed to both caches after a {args.prompt_len}-token prefill")
    except Exception as error:
        traceback.print_exc()
        report.add(name, dtype_name, "decode", None, None, note=f"fla failed: {type(error).__name__}: {error}")
        return
    fla_greedy = torch.cat(fla_greedy, 1)  # (B, steps)

    def agreement(tokens: torch.Tensor) -> str:
        new = tokens[:, args.prompt_len:]
        first = (new != fla_greedy).any(0).nonzero()
        where = "identical" if first.numel() == 0 else f"first difference at new token {int(first[0])}"
        return f"{(new == fla_greedy).float().mean().item():.0%} tokens equal ({where})"

    ours_tokens = ours.generate(prompt, max_new_tokens=args.decode_steps, temperature=0)
    report.add(name, dtype_name, "ours.generate vs fla steps", None, None,
               note=f"greedy: {agreement(ours_tokens)}")
    try:
        with torch.no_grad(), sort_ctx():
            fla_tokens = fla_model.generate(prompt, max_new_tokens=args.decode_steps,
                                            min_new_tokens=args.decode_steps, do_sample=False)
        note = f"fla's own consistency: {agreement(fla_tokens)}"
    except Exception as error:
        traceback.print_exc()
        note = f"fla.generate failed: {type(error).__name__}: {error}"
    report.add(name, dtype_name, "fla.generate vs fla steps", None, None, note=note)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.device == "cpu":
        _enable_interpreter()
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run on a GPU or use --device cpu --tiny (Triton interpreter)")
    MomConfig, MomForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM = _import_fla()
    from mom_lit.interop import load_fla, save_fla

    device = torch.device(args.device)
    backend = args.backend or ("auto" if device.type == "cuda" else "eager")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    common = dict(hidden_size=args.hidden, num_heads=args.heads, head_dim=args.head_dim,
                  num_hidden_layers=args.layers, vocab_size=args.vocab)
    models = {
        "mom": (MomForCausalLM, MomConfig(**common, num_memories=args.memories, topk=args.topk, shared_mem=True,
                                          expand_v=1.0, tie_word_embeddings=False)),
        "gated_deltanet": (GatedDeltaNetForCausalLM, GatedDeltaNetConfig(**common, expand_v=2.0,
                                                                         tie_word_embeddings=True)),
    }
    print(f"torch {torch.__version__}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'Triton interpreter'}), "
          f"mom_lit backend {backend}; shapes: {vars(args)}", flush=True)
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cls, config) in models.items():
            torch.manual_seed(args.seed)
            fla_fp32 = cls(config)
            randomise_norms(fla_fp32, args.seed)
            fla_fp32 = fla_fp32.to(device).eval()
            saved = Path(tmp) / name
            fla_fp32.save_pretrained(saved)

            # The other direction: our export of the imported model, read back by fla.
            ours_fp32, _ = load_fla(saved, dtype=torch.float32, device=device)
            exported = save_fla(ours_fp32, Path(tmp) / f"{name}_export")
            reloaded = cls.from_pretrained(exported).to(device).eval()
            ids = torch.randint(0, args.vocab, (args.batch, args.lengths[0]),
                                generator=torch.Generator().manual_seed(args.seed)).to(device)
            with torch.no_grad(), (fla_stable_sort() if name == "mom" else contextlib.nullcontext()):
                report.add(name, "float32", "export -> fla reload", *errors(reloaded(ids).logits, fla_fp32(ids).logits),
                           note="fla(save_fla(load_fla(x))) vs fla(x)")
            del reloaded

            for dtype_name in args.dtypes.split(","):
                dtype = dtypes[dtype_name]
                ours, ours_config = load_fla(saved, dtype=dtype, device=device)
                ours_config.backend = backend
                if dtype == torch.float32:
                    fla_model = fla_fp32
                else:
                    fla_model = cls.from_pretrained(saved, dtype=dtype).to(device).eval()
                floor_ref = None if dtype == torch.float32 else fla_fp32
                compare(name, fla_model, ours, args, report, dtype_name, floor_ref)
                if name == "mom":
                    compare("mom (stable sort)", fla_model, ours, args, report, dtype_name, floor_ref, stable=True)
                del ours
    table = report.table()
    thresholds = (f"ok: fp32 rel RMS <= {FP32_TOL:g}; bf16 rel RMS <= max({BF16_FACTOR:g} x floor, {BF16_FLOOR:g}) "
                  f"(floor = fla-bf16 vs fla-fp32)")
    print("\n" + table + "\n" + thresholds)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "fla_interop.txt").write_text(table + "\n" + thresholds + "\n")
        (Path(out_dir) / "fla_interop.json").write_text(json.dumps(report.rows, indent=1))
    return 1 if any(r["verdict"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

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

fla-internal rows (``fla ...`` checks) compare fla with itself and need no conversion: fla's chunked prefill
against its fused-recurrent mode on the same input (set by the layers' ``mode``), fla's decoding steps against its
own full forward over the prompt and the fed tokens, a second run of the same steps, and (with fla's kernels) fla's
prefill and steps with its kernels swapped for the torch stand-ins described below. They tell an fla path that
disagrees with fla's other path apart from a conversion error; the ``ours vs ours eager`` rows do the same for
mom_lit's fast path.

Errors are ``max|diff|`` and the relative RMS ``rms(ours - fla) / rms(fla)``. In bfloat16 the column ``floor``
gives fla-bf16 against fla-fp32, the rounding noise that any bf16 implementation carries. fla's MoM layer
groups tokens by memory with ``argsort``, which is not guaranteed to keep time order inside a memory; the
``mom*`` rows repeat the comparison with that sort made stable (the order the layer assumes), which tells an
ordering effect apart from a conversion error. Two known fla departures: on NVIDIA GPUs fla's chunked kernels
run their float32 matrix products in tf32 (its triangular solve always, the other ``tl.dot`` calls by Triton's
default), so its chunked float32 prefill is not a float32 reference; and the CPU ``argsort`` reorders tokens of
one memory, so the unstable ``mom`` rows fail on the CPU by design.

Typical run (repository root, fla wheels installed, CUDA)::

    PYTHONPATH=. python tools/verify_fla_interop.py

``--kernels torch`` (the default with ``--device cpu``) replaces every kernel call of fla's inference path (gated
delta rule, both modes; causal convolution and its one-token update; RMSNorm, gated RMSNorm, the SwiGLU MLP) by
plain-torch token-by-token references written here from the kernels' documented semantics, while fla's own
Python (routing, token sort, padding, cache bookkeeping) runs unchanged: a CPU check of fla's layer logic at
any length, kernels aside. ``--kernels fla`` on the CPU runs fla's Triton kernels under the Triton interpreter
(autotuners limited to their first configuration; slow). There fla 0.6.0's chunked kernels stop on a loop index
used as a tensor (``i_t.to(tl.int64)`` in ``chunk_delta_h.py``; ``tl.cast`` runs), and small standalone calls of
its fused-recurrent kernel returned wrong values after the first token (NaN in some runs) with Triton 3.8, while
inside the models it agreed with the stand-ins; treat interpreter numbers with care. The table is printed and,
when the environment variable OUT names a folder, written to ``$OUT/fla_interop.txt`` (and ``.json``).
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
import torch.nn.functional as F

TINY = dict(hidden=32, heads=2, head_dim=8, layers=2, memories=4, topk=2, vocab=64, lengths="21,45,150",
            prompt_len=13, decode_steps=4, batch=2)
FP32_TOL = 5e-3  # relative RMS; Triton matmuls of fp32 inputs may run in tf32 on both sides
BF16_FACTOR, BF16_FLOOR = 2.0, 2e-2  # bf16 passes under max(BF16_FACTOR * noise floor, BF16_FLOOR)
KNOWN_DIFFERENCES = """\
Known differences on fla's side (fla 0.6.0):
- rows 'mom' (fla's own argsort) fail wherever that sort reorders the tokens of one memory (the CPU sort does);
  the 'mom (stable sort)' rows are the conversion check.
- fla's chunked kernels (prefill above 64 tokens) run fp32 products in tf32 on NVIDIA GPUs; emulated on the CPU
  for the default model at T=200 this costs ~4e-4 rel RMS, under the fp32 tolerance.
- bf16 rows can fail on a top-k routing flip (a near-tie that bf16 rounding tips); the floor shows fla's own.
- 'fla.generate vs fla steps' is informational: with transformers 5.24 fla's MoM generate disagreed with fla's
  own step loop on the CPU (GatedDeltaNet's agreed)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--kernels", choices=("fla", "torch"), default=None,
                        help="fla: fla's Triton kernels (default on cuda; the interpreter on cpu); torch: plain-torch "
                             "references in their place (default on cpu)")
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
    parser.add_argument("--no-fla-generate", action="store_true",
                        help="skip the informational 'fla.generate vs fla steps' row (on an H200 with transformers "
                             "5.17 fla's Hugging Face generate ran for minutes)")
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


# Plain-torch stand-ins for fla's kernels (``--kernels torch``) -----------------------------------------------------
# Written from the semantics that fla documents for each call; fp32 accumulation (fp64 for fp64 inputs).
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(batch: int, length: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every independent sequence: one per row, or the varlen pieces of row 0."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of 1, got {batch}")
    c = cu_seqlens.tolist()
    return [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]


def reference_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                               allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
                               use_gate_in_kernel=False, A_log=None, dt_bias=None, **_):
    """fla's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` one token at a time.

    q, k: (B, T, H, K); v: (B, T, H, V); g, beta: (B, T, H). States (N, H, K, V), or (N, H, V, K) with
    ``state_v_first``. Per token: S <- exp(g) S; S <- S + beta k (v - S^T k)^T; o = S^T (scale q).
    """
    B, T, H, K = q.shape
    out_dtype, acc = v.dtype, _acc_dtype(v.dtype)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:  # x / sqrt(|x|^2 + 1e-6), as fla's kernels do
        q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    if use_gate_in_kernel:
        g = g + (0 if dt_bias is None else dt_bias.to(acc))
        g = -A_log.to(acc).exp() * F.softplus(g)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
    scale = K ** -0.5 if scale is None else scale
    segments = _segments(B, T, cu_seqlens)
    if initial_state is not None and initial_state.shape[0] != len(segments):
        raise ValueError(f"{initial_state.shape[0]} initial states for {len(segments)} sequences")
    o = torch.zeros(*v.shape, dtype=acc, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(segments):
        state = torch.zeros(H, K, v.shape[-1], dtype=acc, device=v.device)  # (H, K, V)
        if initial_state is not None:
            h0 = initial_state[n].to(acc)
            state = (h0.transpose(-1, -2) if state_v_first else h0).clone()
        for t in range(start, end):
            state = state * g[b, t].exp()[:, None, None]
            delta = beta[b, t][:, None] * (v[b, t] - torch.einsum("hk,hkv->hv", k[b, t], state))  # (H, V)
            state = state + k[b, t][:, :, None] * delta[:, None, :]
            o[b, t] = torch.einsum("hk,hkv->hv", q[b, t] * scale, state)
        finals.append(state.transpose(-1, -2) if state_v_first else state)
    final = torch.stack(finals) if output_final_state else None  # fp32 states, as fla keeps them
    return o.to(out_dtype), final


def reference_causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None,
                            output_final_state=False, activation=None, cu_seqlens=None, **_):
    """fla's ``causal_conv1d``: depthwise causal conv of x (B, T, D) with weight (D, W). States (N, D, W) hold
    the last W inputs, slot W-1 the latest; the output at t reads inputs t-W+1..t."""
    if residual is not None:
        raise NotImplementedError("residual")
    B, T, D = x.shape
    W = weight.shape[1]
    acc = _acc_dtype(x.dtype)
    y = torch.zeros(B, T, D, dtype=acc, device=x.device)
    finals = []
    for n, (b, start, end) in enumerate(_segments(B, T, cu_seqlens)):
        init = torch.zeros(D, W, dtype=acc, device=x.device) if initial_state is None else initial_state[n].to(acc)
        seq = torch.cat([init, x[b, start:end].to(acc).t()], dim=1)  # (D, W + L)
        for t in range(end - start):
            y[b, start + t] = (seq[:, t + 1:t + 1 + W] * weight.to(acc)).sum(1)
        finals.append(seq[:, -W:])
    y = y + (0 if bias is None else bias.to(acc))
    y = F.silu(y) if activation in ("silu", "swish") else y
    return y.to(x.dtype), (torch.stack(finals).to(x.dtype) if output_final_state else None)


def reference_causal_conv1d_update(x, cache, residual=None, weight=None, bias=None, activation=None, **_):
    """fla's ``causal_conv1d_update``: one token per sequence, ``cache`` (N, D, W) shifted IN PLACE."""
    if residual is not None:
        raise NotImplementedError("residual")
    acc = _acc_dtype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])  # (N, D) from (N, D), (1, N, D) or (N, 1, D)
    cache.copy_(torch.cat([cache[:, :, 1:], rows.to(cache.dtype).unsqueeze(-1)], dim=-1))
    y = (cache.to(acc) * weight.to(acc)).sum(-1) + (0 if bias is None else bias.to(acc))
    y = F.silu(y) if activation in ("silu", "swish") else y
    return y.to(x.dtype).view(x.shape), cache


def _reference_rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    x = x if residual is None else x + residual
    xf = x.to(_acc_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
    y = (y if self.bias is None else y + self.bias).to(x.dtype)
    return (y, x) if prenorm else y


def _reference_gated_rms_norm(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None or self.activation not in ("swish", "silu"):
        raise NotImplementedError(f"residual or activation {self.activation!r}")
    xf = x.to(_acc_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(xf.dtype)
    return (y * F.silu(g.to(xf.dtype))).to(x.dtype)


def _reference_swiglu_mlp(self, x, **_):
    if self.hidden_act != "swish":
        raise NotImplementedError(f"hidden_act {self.hidden_act!r}")
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _reference_patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, stand-in) for every kernel call of fla's MoM / GatedDeltaNet inference."""
    import fla.layers.gated_deltanet as fla_gdn
    import fla.layers.mom as fla_mom
    import fla.modules.causal_conv1d.ops as fla_conv
    from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm

    patches = [(module, name, reference_gated_delta_rule) for module in (fla_mom, fla_gdn)
               for name in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule")]
    # ShortConvolution.forward / .step look the convolution functions up in their module at call time.
    patches += [(fla_gdn, "causal_conv1d", reference_causal_conv1d),
                (fla_conv, "causal_conv1d", reference_causal_conv1d),
                (fla_conv, "causal_conv1d_update", reference_causal_conv1d_update),
                (RMSNorm, "forward", _reference_rms_norm), (FusedRMSNormGated, "forward", _reference_gated_rms_norm),
                (GatedMLP, "forward", _reference_swiglu_mlp)]
    return patches


@contextlib.contextmanager
def reference_kernels():
    """fla's inference runs on the stand-ins above inside this context, on its own kernels outside it."""
    patches = _reference_patches()
    saved = [getattr(owner, name) for owner, name, _ in patches]
    for owner, name, stand_in in patches:
        setattr(owner, name, stand_in)
    try:
        yield
    finally:
        for (owner, name, _), original in zip(patches, saved):
            setattr(owner, name, original)


def use_reference_kernels() -> None:
    """Route fla's inference through the stand-ins for the rest of the process (``--kernels torch``)."""
    for owner, name, stand_in in _reference_patches():
        setattr(owner, name, stand_in)


@contextlib.contextmanager
def fla_mode(model: torch.nn.Module, mode: str):
    """Set the ``mode`` of every fla token-mixing layer (``chunk`` or ``fused_recurrent``); fla itself picks
    ``fused_recurrent`` up to 64 tokens in inference whatever the mode, and ``mode`` above."""
    layers = [m for m in model.modules() if getattr(m, "mode", None) in ("chunk", "fused_recurrent")]
    saved = [m.mode for m in layers]
    for m in layers:
        m.mode = mode
    try:
        yield
    finally:
        for m, old in zip(layers, saved):
            m.mode = old


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


def _fla_steps(fla_model, prompt: torch.Tensor, tokens: torch.Tensor | None, steps: int):
    """fla's prefill of ``prompt`` and ``steps`` single-token steps on its cache; fed ``tokens`` (B, steps), or its
    own greedy choice when None. Returns the step logits (B, steps, vocab) and the tokens fed."""
    out = fla_model(prompt, use_cache=True)
    past, logits, fed = out.past_key_values, [], []
    for i in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[:, i:i + 1]  # (B, 1)
        fed.append(token)
        out = fla_model(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1), torch.cat(fed, 1)


def _our_steps(ours, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    cache = ours(prompt, use_cache=True).cache
    logits = []
    for i in range(tokens.shape[1]):
        out = ours(tokens[:, i:i + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)  # (B, steps, vocab)


@contextlib.contextmanager
def _top_k_choices(model):
    """Collects each mom_lit router's top-k memory choice (N_tok, k) per layer while the block runs."""
    from mom_lit.router import Router

    choices: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: choices.append(out.memory.sort(-1).values))
               for m in model.modules() if isinstance(m, Router)]
    try:
        yield choices
    finally:
        for handle in handles:
            handle.remove()


def _flips(low: list[torch.Tensor], high: list[torch.Tensor]) -> str:
    """Where two runs' top-k choices differ: a bf16 near-tie that tips sends a token to another memory, and that
    memory's state, hence every later output of the sequence, then differs by far more than rounding."""
    if not low:
        return "no router"
    flips = [(layer, torch.nonzero((a != b).any(-1)).flatten().tolist()) for layer, (a, b) in enumerate(zip(low, high))]
    total = sum(len(tokens) for _, tokens in flips)
    first = next(((layer, tokens[0]) for layer, tokens in flips if tokens), None)
    where = "" if first is None else f", first in layer {first[0]} at flat token {first[1]}"
    return f"top-k differs for {total} of {sum(a.shape[0] for a in low)} (layer, token) choices{where}"


def _worst_step(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, str]:
    """Worst max|diff| and rel RMS over the steps of (B, steps, vocab) logits, and where they fall."""
    per_step = [errors(a[:, i], b[:, i]) for i in range(a.shape[1])]
    worst = max(range(len(per_step)), key=lambda i: per_step[i][1])
    return (max(e[0] for e in per_step), per_step[worst][1],
            f"worst at step {worst}; step 0 rel {per_step[0][1]:.1e}")


@contextlib.contextmanager
def our_backend(ours, backend: str):
    """Run ``ours`` with another scan backend (``eager``: the plain-torch reference) for a while."""
    saved = dict(ours.plans.overrides)
    ours.configure_paths(**{**saved, "backend": backend})
    try:
        yield
    finally:
        ours.configure_paths(**saved)


def compare(name, fla_model, ours, args, report: Report, dtype_name: str, fla_fp32=None, stable: bool = False,
            ours_fp32=None):
    """Prefill, decode and generate comparisons of one (fla, ours) pair in one dtype, with fla-internal rows.
    With ``fla_fp32`` / ``ours_fp32`` (the bf16 runs) each side's own rounding error is reported too."""
    device = next(ours.parameters()).device
    sort_ctx = fla_stable_sort if stable else contextlib.nullcontext
    g = torch.Generator().manual_seed(args.seed + 1)
    for length in args.lengths:
        ids = torch.randint(0, args.vocab, (args.batch, length), generator=g).to(device)
        chunked = length > 64  # fla's inference switch
        with torch.no_grad(), sort_ctx():
            ref = fla_model(ids).logits.float()
            floor = None
            if fla_fp32 is not None:
                floor = errors(ref, fla_fp32(ids).logits.float())[1]
            if chunked:
                with fla_mode(fla_model, "fused_recurrent"):
                    recurrent = fla_model(ids).logits.float()
                alone = fla_model(ids[:1]).logits.float()
            if args.kernels == "fla":
                with reference_kernels():
                    stand_in = fla_model(ids).logits.float()
        with torch.no_grad():
            out = ours(ids).logits.float()
        report.add(name, dtype_name, f"prefill T={length}", *errors(out, ref), floor,
                   note="fla: chunked kernels" if chunked else "fla: fused-recurrent kernel")
        if args.kernels == "fla":
            report.add(name, dtype_name, f"fla kernels vs stand-ins T={length}", *errors(ref, stand_in), floor,
                       note="fla-internal: fla's kernels against this script's torch stand-ins, same fla code")
        if ours_fp32 is not None:
            with torch.no_grad(), _top_k_choices(ours) as low, _top_k_choices(ours_fp32) as high:
                ours(ids)
                own = ours_fp32(ids).logits.float()
            report.add(name, dtype_name, f"ours vs ours fp32 T={length}", *errors(out, own), floor,
                       note=f"ours-internal: our own bf16 error, beside the floor (fla's own); "
                            f"{_flips(low, high)}")
        if ours.plans.config.backend != "eager":
            with torch.no_grad(), our_backend(ours, "eager"):
                eager = ours(ids).logits.float()
            report.add(name, dtype_name, f"ours vs ours eager T={length}", *errors(out, eager), floor,
                       note=f"ours-internal: backend {ours.plans.config.backend} against the plain-torch reference")
        if chunked:
            report.add(name, dtype_name, f"prefill T={length} vs fla recurrent", *errors(out, recurrent), floor,
                       note="fla forced to its fused-recurrent mode")
            report.add(name, dtype_name, f"fla chunk vs fla recurrent T={length}", *errors(ref, recurrent), floor,
                       note="fla-internal: same input, fla's two prefill paths")
            report.add(name, dtype_name, "fla row 0 alone vs in batch", *errors(alone[0], ref[0]), floor,
                       note=f"fla-internal, T={length}: any leak across batch rows")

    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g).to(device)
    try:
        with torch.no_grad(), sort_ctx():
            fla_logits, fla_greedy = _fla_steps(fla_model, prompt, None, args.decode_steps)  # greedy (B, steps)
            full_ids = torch.cat([prompt, fla_greedy], 1)
            with fla_mode(fla_model, "fused_recurrent"):
                fla_full = fla_model(full_ids).logits[:, args.prompt_len:].float()
            again, _ = _fla_steps(fla_model, prompt, fla_greedy, args.decode_steps)
            stand_in = None
            if args.kernels == "fla":
                with reference_kernels():
                    stand_in, _ = _fla_steps(fla_model, prompt, fla_greedy, args.decode_steps)
            floor = None
            if fla_fp32 is not None:
                fp32_logits, _ = _fla_steps(fla_fp32, prompt, fla_greedy, args.decode_steps)
                floor = _worst_step(fla_logits, fp32_logits)[1]
        with torch.no_grad():
            our_logits = _our_steps(ours, prompt, fla_greedy)
            our_full = ours(full_ids).logits[:, args.prompt_len:].float()
            our_eager = None
            if ours.plans.config.backend != "eager":
                with our_backend(ours, "eager"):
                    our_eager = _our_steps(ours, prompt, fla_greedy)

        def step_row(check, logits, reference, note, row_floor=floor):  # worst step of a decode comparison
            *worst, where = _worst_step(logits, reference)
            report.add(name, dtype_name, check, *worst, row_floor, note=f"{note}; {where}")

        step_row(f"decode {args.decode_steps} steps (worst)", our_logits, fla_logits,
                 f"same tokens fed to both caches after a {args.prompt_len}-token prefill")
        step_row("fla steps vs fla full forward", fla_logits, fla_full,
                 "fla-internal: its cache path against its prefill of prompt + fed tokens")
        if stand_in is not None:
            step_row("fla step kernels vs stand-ins", fla_logits, stand_in,
                     "fla-internal: prefill + steps on fla's kernels against the torch stand-ins")
        step_row("fla steps, run 2 vs run 1", again, fla_logits,
                 "fla-internal: the same steps again (0 unless fla keeps state between calls)", row_floor=None)
        step_row("ours steps vs ours full forward", our_logits, our_full,
                 "ours-internal: our cache path against our prefill of prompt + fed tokens")
        if our_eager is not None:
            step_row("ours steps vs ours eager steps", our_logits, our_eager,
                     f"ours-internal: backend {ours.plans.config.backend} against the plain-torch reference")
    except Exception as error:
        traceback.print_exc()
        report.add(name, dtype_name, "decode", None, None, note=f"fla failed: {type(error).__name__}: {error}")
        return

    def agreement(tokens: torch.Tensor) -> str:
        new = tokens[:, args.prompt_len:]
        first = (new != fla_greedy).any(0).nonzero()
        where = "identical" if first.numel() == 0 else f"first difference at new token {int(first[0])}"
        return f"{(new == fla_greedy).float().mean().item():.0%} tokens equal ({where})"

    ours_tokens = ours.generate(prompt, max_new_tokens=args.decode_steps, temperature=0)
    report.add(name, dtype_name, "ours.generate vs fla steps", None, None,
               note=f"greedy: {agreement(ours_tokens)}")
    if args.no_fla_generate:
        return
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
    args.kernels = args.kernels or ("torch" if args.device == "cpu" else "fla")
    if args.device == "cpu" and args.kernels == "fla":
        _enable_interpreter()
    elif args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run on a GPU or use --device cpu (fla's kernels replaced by torch references)")
    MomConfig, MomForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM = _import_fla()
    if args.kernels == "torch":
        use_reference_kernels()
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
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), fla kernels: "
          f"{'torch references' if args.kernels == 'torch' else 'Triton' if device.type == 'cuda' else 'interpreter'}, "
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
            ours_fp32.configure_paths(backend=backend)
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
                ours, _ = load_fla(saved, dtype=dtype, device=device)
                ours.configure_paths(backend=backend)
                if dtype == torch.float32:
                    fla_model = fla_fp32
                else:
                    fla_model = cls.from_pretrained(saved, dtype=dtype).to(device).eval()
                floor_ref = None if dtype == torch.float32 else fla_fp32
                own_ref = None if dtype == torch.float32 else ours_fp32
                compare(name, fla_model, ours, args, report, dtype_name, floor_ref, ours_fp32=own_ref)
                if name == "mom":
                    compare("mom (stable sort)", fla_model, ours, args, report, dtype_name, floor_ref, stable=True,
                            ours_fp32=own_ref)
                del ours
    table = report.table()
    thresholds = (f"ok: fp32 rel RMS <= {FP32_TOL:g}; bf16 rel RMS <= max({BF16_FACTOR:g} x floor, {BF16_FLOOR:g}) "
                  f"(floor = fla-bf16 vs fla-fp32)\n" + KNOWN_DIFFERENCES)
    print("\n" + table + "\n" + thresholds)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "fla_interop.txt").write_text(table + "\n" + thresholds + "\n")
        (Path(out_dir) / "fla_interop.json").write_text(json.dumps(report.rows, indent=1))
    return 1 if any(r["verdict"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

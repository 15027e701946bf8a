"""Side-by-side GPU benchmark of the MoM layer and model against fla and SDPA attention.

Sections (``--sections``; per-token decoding latency is ``tools/bench_decode.py``'s):
  layer   one layer forward and forward+backward (loss = sum of outputs), peak memory
  model   a 12-layer model, one training step (forward + backward), tokens/s, peak memory
  profile top device kernels of each selected layer's forward+backward (8 x 2048, or --profile-shape)
  profile_model  the same for each selected model's training step

Settings follow the reference figures (hidden 1024, 4 heads x 256, expand_v 1, short conv 4, E=4, top-2, shared
memory, bf16). fla (flash-linear-attention) and transformers are optional: rows whose library is missing are
skipped. fla 0.6.0 refuses the gated backward on Hopper with Triton < 3.7.1 because it computes wrong gradients
there; ``--fla-timing-only`` lifts that guard so that its speed can be timed, never to trust its numbers.

Example (GPU):  python tools/bench_layer.py --sections layer,model --out bench.md
Smoke run (CPU): python tools/bench_layer.py --device cpu --tiny --sections layer,model
Mixed precision (fp32 weights, products under bf16 autocast, as Lightning's bf16-mixed): add --mixed
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import (GIB, SDPAAttention, bench, bench_rounds, checkpoint_blocks, device_name,  # noqa: E402
                      error_cell, fla_available, fla_hopper_guard_lifted, format_ms, mean_ms, model_dims, parse_shape,
                      peak_memory_gib, release_cached, sync, table_header, table_row)
from mom_lit import MoMConfig, MoMForCausalLM, MoMLayer  # noqa: E402
from mom_lit.cuda_graphs import capture_cuda_graph  # noqa: E402
from mom_lit.layout import sequence_ids  # noqa: E402
from mom_lit.ops import stage_launch  # noqa: E402
from mom_lit.ops.scan.triton import scan as scan_kernels  # noqa: E402


# --------------------------------------------------------------------------------------------------- layers
class OurLayer(nn.Module):
    def __init__(self, cfg: MoMConfig, paths: dict):
        super().__init__()
        self.layer = MoMLayer(cfg)
        self.layer.configure_paths(**paths)

    def forward(self, x):
        b, t, _ = x.shape
        return self.layer(x, sequence_ids(b, t, None, x.device), b)[0]


def _timer(args):
    """How one candidate is timed: ``bench`` on ``--device`` over ``--rep-ms`` of repeats."""
    return functools.partial(bench, device=args.device, rep_ms=args.rep_ms)


def selected(args, candidates: dict):
    skip = [s for s in args.skip.split(",") if s]
    return [(name, make) for name, make in candidates.items() if not any(s in name for s in skip)]


def _our_settings(args):
    """(backend, activation memory, label) of each of our candidates: every backend with every --activation-memory
    setting; the label names the setting unless it is the only one."""
    for backend in args.backends:
        for memory in args.activation_memory:
            yield backend, memory, backend if len(args.activation_memory) == 1 else f"{backend}, {memory}"


def layer_candidates(args, hidden, heads, head_dim):
    cands = {}
    for backend, memory, label in _our_settings(args):
        cfg = MoMConfig(hidden_size=hidden, num_heads=heads, head_dim=head_dim, expand_v=1.0, num_memories=4, topk=2,
                        shared_memory=True, num_layers=12, backend=backend, vocab_size=32000,
                        activation_memory=memory)
        cands[f"mom_lit MoM ({label})"] = lambda cfg=cfg: OurLayer(cfg, args.paths)
        gdn = MoMConfig(**{**cfg.to_dict(), "num_memories": 1, "topk": 1, "shared_memory": False})
        cands[f"mom_lit GDN, 1 memory ({label})"] = lambda cfg=gdn: OurLayer(cfg, args.paths)
    if fla_available():
        from fla.layers import GatedDeltaNet, MomAttention

        cands["fla GatedDeltaNet"] = lambda: _first(GatedDeltaNet(hidden_size=hidden, num_heads=heads,
                                                                  head_dim=head_dim, expand_v=1))
        cands["fla MomAttention"] = lambda: _first(MomAttention(hidden_size=hidden, num_heads=heads, head_dim=head_dim,
                                                                expand_v=1, num_memories=4, topk=2, shared_mem=True))
    cands["SDPA attention"] = lambda: SDPAAttention(hidden)
    return cands


class _first(nn.Module):
    """fla layers return tuples: keep the output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


def _weights_dtype(args, dtype: torch.dtype) -> torch.dtype:
    """Weights and inputs in ``dtype``, or with ``--mixed`` in fp32 with the products in ``dtype`` (autocast)."""
    return torch.float32 if args.mixed else dtype


def _autocast(args, dtype: torch.dtype):
    """Lightning's ``bf16-mixed``: the forward under autocast in ``dtype`` (a no-op context without ``--mixed``).
    Its cast cache is off under ``--cuda-graph``: cached casts would outlive the capture they belong to."""
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=args.mixed,
                          cache_enabled=not args.cuda_graph)


def _fwd_bwd(module, x, args, dtype):
    """Forward (under autocast with ``--mixed``) and backward of the sum of the outputs. The gradients are set to
    None first, as a training step's ``zero_grad`` does: repeated calls would otherwise also time one addition
    per parameter (and of x's gradient) that no training step runs."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with _autocast(args, dtype):
        y = module(x)
    y.float().sum().backward()


def section_layer(args, dtype, rows):
    """Every selected layer's forward + backward and forward, timed in turn for --rounds rounds at each shape."""
    hidden, heads, head_dim = (64, 2, 16) if args.tiny else (1024, 4, 256)
    shapes = [(2, 64), (1, 128)] if args.tiny else [(8, 2048), (2, 8192)]
    modules = {}
    for name, make in selected(args, layer_candidates(args, hidden, heads, head_dim)):
        torch.manual_seed(0)
        modules[name] = make().to(args.device, _weights_dtype(args, dtype)).train()
    for b, t in shapes:
        fwd_bwd, fwd, inputs = {}, {}, {}
        for name, module in modules.items():
            x = torch.randn(b, t, hidden, device=args.device, dtype=_weights_dtype(args, dtype), requires_grad=True)
            inputs[name] = x
            fwd_bwd[name] = lambda module=module, x=x: _fwd_bwd(module, x, args, dtype)

            def forward(module=module, x=x):
                with torch.no_grad(), _autocast(args, dtype):
                    module(x)

            fwd[name] = forward
        times_fb = bench_rounds(fwd_bwd, args.rounds, _timer(args))
        times_f = bench_rounds(fwd, args.rounds, _timer(args))
        for name in modules:
            mem = None
            if not isinstance(times_fb[name], str):
                mem = _alone_peak_gib(modules, name, fwd_bwd[name], args.device, inputs)
            rows.append(("layer", name, f"{b}x{t}", format_ms(times_fb[name]), format_ms(times_f[name]),
                         "" if mem is None else f"{mem:.2f} GiB"))
            print(rows[-1], flush=True)


def _our_model(cfg: MoMConfig, paths: dict) -> MoMForCausalLM:
    model = MoMForCausalLM(cfg)
    model.configure_paths(**paths)
    return model


def model_candidates(args, tiny):
    dims = model_dims(tiny)
    cands = {}
    for backend, memory, label in _our_settings(args):
        ours = dict(dims, backend=backend, tie_embeddings=False, activation_memory=memory)
        cands[f"mom_lit MoM ({label})"] = lambda ours=ours: _our_model(MoMConfig(
            **ours, num_memories=4, topk=2, shared_memory=True), args.paths)
        cands[f"mom_lit GDN ({label})"] = lambda ours=ours: _our_model(MoMConfig(
            **ours, num_memories=1, topk=1, shared_memory=False), args.paths)
    if fla_available():
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, MomConfig, MomForCausalLM

        common = dict(hidden_size=dims["hidden_size"], num_heads=dims["num_heads"], head_dim=dims["head_dim"],
                      expand_v=1, num_hidden_layers=dims["num_layers"], vocab_size=dims["vocab_size"])
        cands["fla MomForCausalLM"] = lambda: _HF(MomForCausalLM(MomConfig(**common, num_memories=4, topk=2,
                                                                           shared_mem=True)))
        cands["fla GatedDeltaNetForCausalLM"] = lambda: _HF(GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**common)))
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        cands["HF Llama (SDPA)"] = lambda: _HF(LlamaForCausalLM(LlamaConfig(
            hidden_size=dims["hidden_size"], num_attention_heads=16 if not tiny else 2,
            num_key_value_heads=16 if not tiny else 2, intermediate_size=2816 if not tiny else 128,
            num_hidden_layers=dims["num_layers"], vocab_size=dims["vocab_size"], attn_implementation="sdpa")))
    except Exception:
        pass
    return cands


class _HF(nn.Module):
    """Hugging Face style models: forward(input_ids, labels) -> .loss; decode with past_key_values."""

    hf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, labels=None):
        return self.inner(input_ids=ids, labels=labels)


def _training_step(make, args, dtype, b: int, t: int):
    """A fresh model and its training step (forward + backward of the LM loss on random ids of shape (b, t))."""
    torch.manual_seed(0)
    model = make().to(args.device, _weights_dtype(args, dtype)).train()
    vocab = model.inner.config.vocab_size if isinstance(model, _HF) else model.config.vocab_size
    ids = torch.randint(0, vocab, (b, t), device=args.device)

    def step():
        model.zero_grad(set_to_none=True)
        with _autocast(args, dtype):
            loss = model(ids, labels=ids).loss
        loss.backward()

    if args.cuda_graph:
        return model, _graphed(step)
    return model, step


def _graphed(step):
    """``step`` (forward + backward) captured once as a CUDA graph; returns its replay. The capture fails if the
    step synchronises with the host or launches work whose sizes the host reads from the device. ``step`` sets the
    gradients to None first, so that the backward allocates them inside the capture and every replay writes them
    anew instead of accumulating. The replay holds ``step``, and with it the token ids that the graph reads in
    place: were they freed, their memory could be handed to another tensor (another model's, say) and the replays
    would read whatever that holds."""
    graph, _ = capture_cuda_graph(step, warmup=3)

    def replay(step=step):  # noqa: ARG001 - held for its inputs, not called
        graph.replay()

    return replay


def _graph_memory_gib() -> float:
    """A captured step's memory: what the caching allocator holds once its free blocks are released, that is the
    graph's private pool (every tensor of the step, alive or not at its end) plus the weights and gradients. The
    replay allocates nothing, so the peak of allocated memory would miss the pool."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved() / GIB


def section_model(args, dtype, rows):
    """Every selected model's training step at 8 x 2048. With --rounds 1 one model is alive at a time; with more,
    all of them are, and their steps are timed in turn."""
    b, t = (2, 64) if args.tiny else (8, 2048)
    cands = model_candidates(args, args.tiny)
    for _, _, label in _our_settings(args):  # activation checkpointing's memory/time trade (skip: "checkpointed")
        cands[f"mom_lit MoM, checkpointed blocks ({label})"] = \
            lambda make=cands[f"mom_lit MoM ({label})"]: checkpoint_blocks(make())
    if args.rounds == 1:
        for name, make in selected(args, cands):
            _time_models(args, dtype, {name: make}, b, t, rows)
            release_cached(args.device)
    else:
        _time_models(args, dtype, dict(selected(args, cands)), b, t, rows)


def _time_models(args, dtype, makers: dict, b: int, t: int, rows) -> None:
    """Build every model of ``makers``, time their training steps in turn (``bench_rounds``), then measure each
    one's memory as if it were alone (eager: ``_alone_peak_gib``), or the growth of the reserved memory when its
    step was captured (--cuda-graph: the graph's pool and its weights and gradients)."""
    models, steps, memory, failed = {}, {}, {}, {}
    reserved = 0.0
    for name, make in makers.items():
        try:
            models[name], steps[name] = _training_step(make, args, dtype, b, t)
            if args.cuda_graph:
                memory[name] = _graph_memory_gib() - reserved
                reserved += memory[name]
        except Exception as e:
            failed[name] = error_cell(e)
    times = bench_rounds(steps, args.rounds, _timer(args))
    for name in makers:
        result = failed.get(name) or times[name]
        if isinstance(result, str):
            rows.append(("model", name, f"{b}x{t}", result, "", ""))
            print(rows[-1], flush=True)
            continue
        mem = memory.get(name) if args.cuda_graph else _alone_peak_gib(models, name, steps[name], args.device)
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        ms = statistics.median(result)
        rows.append(("model", f"{name} ({params:.1f} M)", f"{b}x{t}", format_ms(result, 1),
                     f"{b * t / ms:.1f} K tok/s", "" if mem is None else f"{mem:.2f} GiB"))
        print(rows[-1], flush=True)


def _alone_peak_gib(modules: dict, name: str, step, device: str, inputs: dict | None = None,
                    measure=peak_memory_gib) -> float | None:
    """Peak memory of ``step`` (``modules[name]``'s, by ``measure(step, device)``), as if that module and its input
    were the only ones alive: every gradient is dropped first, and the other modules' weights and inputs are left
    out of the peak."""
    inputs = inputs or {}
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    for x in inputs.values():
        x.grad = None
    peak = measure(step, device)
    if peak is None:
        return None
    others = [p for other, module in modules.items() if other != name for p in module.parameters()]
    others += [x for other, x in inputs.items() if other != name]
    return peak - sum(t.numel() * t.element_size() for t in others) / GIB


def _profile(fn, args, label: str) -> str:
    """Kernels by self device time over 3 calls of ``fn`` after 3 warm-up calls, and the wall time per call
    beside the device time per call (a wall time well above the device time means the host is the bottleneck).
    With ``--profile-json``, every kernel's device milliseconds and launches per call are added to that file under
    ``label``, so that two profiles can be compared kernel by kernel."""
    cuda = args.device == "cuda"
    wall_ms = mean_ms(fn, args.device, calls=3, warmup=3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            fn()
        sync(args.device)
    averages = prof.key_averages()
    self_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    total_key = "cuda_time_total" if cuda else "cpu_time_total"
    kernels = [a for a in averages if getattr(a, "device_type", None) == torch.autograd.DeviceType.CUDA]
    device_ms = sum(a.self_device_time_total for a in kernels) / 3 / 1e3
    if args.profile_json:
        path = Path(args.profile_json)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[label] = {"wall_ms": wall_ms, "device_ms": device_ms,
                        "kernels": {a.key: [a.self_device_time_total / 3 / 1e3, a.count / 3] for a in kernels}}
        path.write_text(json.dumps(table, indent=1))
    return (f"profile of {label}, 3 calls\nwall time per call (unprofiled): {wall_ms:.2f} ms; device time per call "
            f"(profiled, sum of kernels): {device_ms:.2f} ms\n\nkernels by self device time:\n"
            + averages.table(sort_by=self_key, row_limit=args.profile_rows, max_name_column_width=90)
            + "\n\noperators by total device time (children included):\n"
            + averages.table(sort_by=total_key, row_limit=args.profile_rows, max_name_column_width=90)
            + "\n\noperators by self host time (where the host's time goes):\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=90)
            + "\n\noperators by input shapes and self device time (which tensors the small launches touch):\n"
            + prof.key_averages(group_by_input_shape=True).table(
                sort_by=self_key, row_limit=args.profile_rows, max_name_column_width=40, max_shapes_column_width=90))


def _report_profile(args, report: str) -> None:
    print(report, flush=True)
    if args.profile_out:
        with open(args.profile_out, "a") as f:
            f.write(report + "\n\n")


def section_profile(args, dtype, rows):
    """Where the time of each selected layer's forward+backward goes (top device kernels), at --profile-shape."""
    hidden, heads, head_dim = (64, 2, 16) if args.tiny else (1024, 4, 256)
    b, t = (2, 64) if args.tiny else args.profile_shape
    for name, make in selected(args, layer_candidates(args, hidden, heads, head_dim)):
        torch.manual_seed(0)
        module = make().to(args.device, _weights_dtype(args, dtype)).train()
        x = torch.randn(b, t, hidden, device=args.device, dtype=_weights_dtype(args, dtype), requires_grad=True)
        _report_profile(args, _profile(lambda: _fwd_bwd(module, x, args, dtype), args,
                                       f"layer {name}, {b}x{t}, fwd+bwd"))
        del module
        release_cached(args.device)


def section_profile_model(args, dtype, rows):
    """Where the time of each selected model's training step goes (top device kernels), at --profile-shape."""
    b, t = (2, 64) if args.tiny else args.profile_shape
    for name, make in selected(args, model_candidates(args, args.tiny)):
        model, step = _training_step(make, args, dtype, b, t)
        _report_profile(args, _profile(step, args, f"model {name}, {b}x{t}, training step"))
        del model
        release_cached(args.device)


def _launch_from_json(path: str, default, launch_type, label: str):
    """``default`` (the slot/mix stages' or the scan's launch settings) with the fields of the JSON file ``path``,
    as ``tools/bench_stages.py --best-json`` or ``tools/bench_kernels.py --launch-json`` write them; nested objects
    become ``launch_type``."""
    fields = {name: launch_type(**value) if isinstance(value, dict) else value
              for name, value in json.loads(Path(path).read_text()).items()}
    launch = dataclasses.replace(default, **fields)
    print(f"{label} launch settings: {launch}", flush=True)
    return launch


_PROFILE_LABEL = re.compile(r"^(?P<kind>layer|model) (?P<name>.+), (?P<shape>\d+x\d+), (?P<what>.+)$")


def summarize_profiles(table: dict) -> str:
    """A markdown table of the profiles that ``--profile-json`` recorded: device and wall time per call, launches per
    call, and the device-time ratio to fla's GatedDeltaNet profiled at the same shape (where that row exists)."""
    rows = []
    for label, entry in table.items():
        match = _PROFILE_LABEL.match(label)
        if match is None or not {"device_ms", "wall_ms", "kernels"} <= entry.keys():
            raise ValueError(f"not a profile recorded by --profile-json: {label!r}")
        launches = sum(count for _, count in entry["kernels"].values())
        rows.append((match["kind"], match["name"], match["shape"], entry["device_ms"], entry["wall_ms"], launches))
    reference = {(kind, shape): device for kind, name, shape, device, _, _ in rows
                 if name.startswith("fla GatedDeltaNet")}
    lines = ["| profile | shape | device time per call | wall time per call | launches per call | device time / fla "
             "GatedDeltaNet's |", "|---|---|---|---|---|---|"]
    for kind, name, shape, device, wall, launches in rows:
        ref = reference.get((kind, shape))
        ratio = f"{device / ref:.2f}x" if ref else "-"
        lines.append(f"| {kind} {name} | {shape} | {device:.3f} ms | {wall:.2f} ms | {launches:.0f} | {ratio} |")
    return "\n".join(lines)


def _activation_memories(text: str) -> list[str]:
    """``"fast,balanced"`` -> ["fast", "balanced"]; an unknown setting is a usage error naming the option."""
    settings = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in settings if part not in ("fast", "balanced", "lean")]
    if not settings or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma list of fast, balanced and lean, got {text!r}")
    return settings


SECTIONS = {"layer": section_layer, "model": section_model, "profile": section_profile,
            "profile_model": section_profile_model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="layer,model",
                   help="comma list of layer, model, profile, profile_model")
    p.add_argument("--backends", default=None, help="comma list of mom_lit scan backends (default: triton on CUDA)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--fla-timing-only", action="store_true", help="lift fla's Hopper guard (timing only)")
    p.add_argument("--skip", default="", help="comma list of substrings: candidates whose name contains one are skipped")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--rep-ms", type=int, default=500, help="CUDA: milliseconds of timed repeats per measurement")
    p.add_argument("--profile-rows", type=int, default=25, help="rows of each profile table")
    p.add_argument("--profile-out", default=None, help="append the profile tables to this file too")
    p.add_argument("--profile-shape", type=parse_shape, default=(8, 2048), metavar="BxT",
                   help="batch x sequence length of the profile and profile_model sections (default 8x2048)")
    p.add_argument("--profile-json", default=None,
                   help="add each profile's kernels (device ms and launches per call) to this JSON file")
    p.add_argument("--mixed", action="store_true",
                   help="fp32 weights and inputs, forward under torch.autocast in --dtype (Lightning's bf16-mixed); "
                        "the layer, model and profile sections")
    p.add_argument("--scan-recompute", choices=("none", "states", "wy"), default=None,
                   help="what the Triton scan's backward rebuilds (default: by activation memory, states for fast, "
                        "wy for balanced and lean); none keeps the chunk states (more memory)")
    p.add_argument("--stage-launch-json", default=None,
                   help="launch settings of the slot/mix kernels to use (a JSON object of StageLaunchConfig fields, "
                        "as tools/bench_stages.py --best-json writes)")
    p.add_argument("--scan-launch-json", default=None,
                   help="launch settings of the scan's kernels to use (a JSON object of LaunchConfig fields, as "
                        "tools/bench_kernels.py --launch-json writes)")
    p.add_argument("--summarize-profiles", default=None, metavar="JSON",
                   help="print a table of the profiles recorded in this --profile-json file (device and wall time, "
                        "launches, ratio to fla's GatedDeltaNet at the same shape) and exit")
    p.add_argument("--cuda-graph", action="store_true",
                   help="model and profile_model sections: the training step (forward + backward) captured once as "
                        "a CUDA graph and replayed (no host overhead; the capture fails on any host synchronisation)")
    p.add_argument("--activation-memory", type=_activation_memories, default=["fast"], metavar="SETTINGS",
                   help="comma list of MoMConfig.activation_memory settings of our layers and models, one candidate "
                        "each (fast, the default; balanced: the Triton scan rebuilds its inputs in the backward from "
                        "the kept projections; lean: the projections too)")
    p.add_argument("--rounds", type=int, default=1,
                   help="layer and model sections: time every selected candidate once per round, in turn, this many "
                        "rounds, and report the median and range over the rounds (with more than 1, all selected "
                        "models are alive at once)")
    p.add_argument("--projections", choices=("auto", "dense"), default=None,
                   help="MoMConfig.projections: dense projects every stream for every token instead of the "
                        "selected streams only (auto, the default, where the grouped product applies)")
    p.add_argument("--stages", choices=("auto", "triton", "reference"), default=None,
                   help="MoMConfig.stages of our layers and models: reference runs the torch.compile'd reference "
                        "stages around the scan instead of the Triton slot/mix kernels")
    args = p.parse_args()
    if args.summarize_profiles:
        try:
            print(summarize_profiles(json.loads(Path(args.summarize_profiles).read_text())))
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            p.error(f"--summarize-profiles {args.summarize_profiles}: {error}")
        return
    if args.cuda_graph and args.device != "cuda":
        p.error("--cuda-graph needs a CUDA device")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)} (decoding: tools/bench_decode.py)")
    # how our layers run, handed to every candidate (config fields and launch settings)
    args.paths = {name: value for name, value in (("projections", args.projections), ("stages", args.stages),
                                                  ("scan_recompute", args.scan_recompute)) if value is not None}
    if args.stage_launch_json:
        args.paths["stage_launch"] = _launch_from_json(args.stage_launch_json, stage_launch.DEFAULT_LAUNCH,
                                                       stage_launch.StageLaunch, "slot/mix")
    if args.scan_launch_json:
        args.paths["scan_launch"] = _launch_from_json(args.scan_launch_json, scan_kernels.DEFAULT_LAUNCH,
                                                      scan_kernels.Launch, "scan")
    args.backends = (args.backends or ("triton" if args.device == "cuda" else "compiled")).split(",")
    dtype = getattr(torch, args.dtype)
    card = device_name(args.device)
    precision = f"fp32 weights, autocast {args.dtype}" if args.mixed else args.dtype
    settings = f"activation memory {','.join(args.activation_memory)}" + \
        (f", scan recompute {args.scan_recompute}" if args.scan_recompute else "") + \
        (f", projections {args.projections}" if args.projections else "") + \
        (f", stages {args.stages}" if args.stages else "") + \
        (", steps captured as CUDA graphs" if args.cuda_graph else "") + \
        (f", {args.rounds} rounds (median, range)" if args.rounds > 1 else "")
    print(f"device: {card}; torch {torch.__version__}; {precision}; {settings}", flush=True)
    rows: list[tuple] = []
    with fla_hopper_guard_lifted(args.fla_timing_only):
        for s in args.sections.split(","):
            SECTIONS[s](args, dtype, rows)
    lines = [f"Device: {card}, torch {torch.__version__}, {precision}, {settings}", "",
             *table_header(["section", "candidate", "shape", "time (fwd+bwd / step)", "fwd only / throughput",
                            "peak memory"])]
    lines += [table_row(r) for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

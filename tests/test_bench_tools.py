"""Smoke runs of the GPU benchmark script on CPU (tiny shapes): its options keep working without a GPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tools_import import load_tool

pytest.importorskip("triton", reason="the benchmark tools import triton (not installed)")

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("extra", [pytest.param([], id="bf16-weights"), pytest.param(["--mixed"], id="mixed")])
def test_bench_layer_tiny_cpu_run(extra, tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_layer.py"), "--device", "cpu", "--tiny", "--sections", "layer",
           "--skip", "fla,SDPA,GDN", "--rep-ms", "20", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert ("fp32 weights, autocast bfloat16" in table) == bool(extra)
    rows = [line for line in table.splitlines() if line.startswith("| layer | mom_lit MoM")]
    assert len(rows) == 2, table  # both tiny shapes
    for row in rows:
        assert " ms | " in row and "error" not in row, row


def test_bench_layer_rounds_and_settings_side_by_side_on_cpu(tmp_path):
    """--activation-memory takes a list (one candidate each, named by its setting) and --rounds gives every
    layer and model row a median with its range."""
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_layer.py"), "--device", "cpu", "--tiny", "--sections",
           "layer,model", "--skip", "fla,SDPA,GDN,Llama,checkpointed", "--rep-ms", "20", "--rounds", "2",
           "--activation-memory", "fast,balanced", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "activation memory fast,balanced, 2 rounds (median, range)" in table
    for section, count in [("layer", 4), ("model", 2)]:  # two settings (x two shapes for the layer)
        rows = [line for line in table.splitlines() if line.startswith(f"| {section} | mom_lit MoM")]
        assert len(rows) == count, table
        assert sum("(compiled, balanced)" in row for row in rows) == count // 2, table
        for row in rows:
            assert re.search(r"\| [0-9.]+ ms \([0-9.]+-[0-9.]+\) \|", row), row


def test_bench_layer_rounds_time_candidates_in_turn():
    """--rounds: every round times each candidate once, in the order given; the row gives the median and the range;
    a candidate that fails is reported with its error and not timed again, the others still are."""
    bench_layer = load_tool("bench_layer")
    calls = []
    times = iter([3.0, 7.0, 1.0, 9.0, 2.0, 8.0])

    def bench(fn):
        fn()
        return next(times)

    def broken():
        calls.append("broken")
        raise RuntimeError("out of resource")

    result = bench_layer.bench_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                                       "broken": broken}, rounds=3, time_one=bench)
    assert calls == ["a", "b", "broken", "a", "b", "a", "b"]
    assert result["a"] == [3.0, 1.0, 2.0] and result["b"] == [7.0, 9.0, 8.0]
    assert result["broken"] == "error: RuntimeError: out of resource"
    assert bench_layer.format_ms(result["a"]) == "2.00 ms (1.00-3.00)"
    assert bench_layer.format_ms([101.26], 1) == "101.3 ms"  # one round: no range
    assert bench_layer.format_ms(result["broken"]) == result["broken"]


def test_bench_layer_memory_of_one_candidate_among_several():
    """With several candidates alive, a candidate's peak leaves out the others' weights and inputs, and every
    gradient is dropped before its step runs (the others' would otherwise stay in its peak)."""
    import torch

    bench_layer = load_tool("bench_layer")
    modules = {"a": torch.nn.Linear(256, 256, bias=False), "b": torch.nn.Linear(512, 512, bias=False)}
    inputs = {"a": torch.zeros(1024, requires_grad=True), "b": torch.zeros(2048, requires_grad=True)}
    for module in modules.values():
        module.weight.grad = torch.ones_like(module.weight)
    inputs["b"].grad = torch.ones(2048)
    seen = []

    def peak(step, device):
        seen.append([m.weight.grad for m in modules.values()] + [x.grad for x in inputs.values()])
        return 1.0

    mem = bench_layer._alone_peak_gib(modules, "a", lambda: None, "cuda", inputs, measure=peak)
    assert seen == [[None, None, None, None]]
    assert mem == pytest.approx(1.0 - (512 * 512 + 2048) * 4 / 2**30)
    assert bench_layer._alone_peak_gib(modules, "a", lambda: None, "cpu") is None  # no peak off CUDA


def test_bench_layer_graphed_replay_keeps_the_step_inputs_alive(monkeypatch):
    """A captured step reads its token ids in place: the replay that _graphed returns must keep them alive, or their
    memory could go to another tensor while the graph is still replayed."""
    import gc
    import weakref

    bench_layer = load_tool("bench_layer")

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    monkeypatch.setattr(bench_layer, "capture_cuda_graph", lambda fn, warmup: (Graph(), None))

    class Ids:  # stands for the token ids that only the step's closure holds
        pass

    def make_step():
        ids = Ids()

        def step():
            return ids

        return step, weakref.ref(ids)

    step, ids = make_step()
    replay = bench_layer._graphed(step)
    del step
    gc.collect()
    assert ids() is not None
    replay()
    assert Graph.replays == 1


def test_bench_layer_profile_json_and_stage_launch_on_cpu(tmp_path):
    """--profile-json records every profiled step under its label; --stage-launch-json and --scan-launch-json set the
    slot/mix and scan launch settings and --projections the projection path (all printed); --cuda-graph refuses a
    CPU run with a clear message."""
    launch = tmp_path / "launch.json"
    launch.write_text(json.dumps({"conv_fwd": {"rows": 8, "num_warps": 2}, "dx_span": 256}))
    scan_launch = tmp_path / "scan_launch.json"
    scan_launch.write_text(json.dumps({"dqk": {"num_warps": 4, "num_stages": 2, "block_k": 128, "block_v": 32},
                                       "state_block_v": 32}))
    profile = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_layer.py"), "--device", "cpu", "--tiny", "--sections",
           "profile_model", "--skip", "fla,Llama,GDN", "--profile-rows", "3", "--profile-json", str(profile),
           "--stage-launch-json", str(launch), "--scan-launch-json", str(scan_launch), "--projections", "dense"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "conv_fwd=StageLaunch(rows=8, num_warps=2)" in proc.stdout and "dx_span=256" in proc.stdout
    assert "dqk=Launch(num_warps=4, num_stages=2, block_k=128, block_v=32)" in proc.stdout
    assert "state_block_v=32" in proc.stdout and "projections dense" in proc.stdout
    assert "operators by self host time" in proc.stdout and "operators by input shapes" in proc.stdout
    recorded = json.loads(profile.read_text())
    assert list(recorded) == ["model mom_lit MoM (compiled), 2x64, training step"]
    assert recorded[next(iter(recorded))]["wall_ms"] > 0
    proc = subprocess.run(cmd[:2] + ["--device", "cpu", "--cuda-graph"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2 and "--cuda-graph needs a CUDA device" in proc.stderr
    proc = subprocess.run(cmd[:2] + ["--device", "cpu", "--profile-shape", "8by2048"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--profile-shape" in proc.stderr and "expected BxT" in proc.stderr
    for bad, message in [(["--activation-memory", "fast,leaner"], "expected a comma list"),
                         (["--rounds", "0"], "--rounds must be at least 1")]:
        proc = subprocess.run(cmd[:2] + ["--device", "cpu", *bad], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def _bench_kernels():
    return load_tool("bench_kernels")


def _profile_entry(device_ms: float, wall_ms: float, launches: dict[str, float]) -> dict:
    return {"wall_ms": wall_ms, "device_ms": device_ms, "kernels": {name: [0.1, n] for name, n in launches.items()}}


def test_summarize_profiles_compares_each_shape_with_fla(tmp_path):
    """The device-time ratio of a row is to fla's GatedDeltaNet of the same kind and shape, and "-" where none was
    profiled; launches per call add up every kernel's count; a file that is no --profile-json record is refused."""
    table = {
        "layer mom_lit MoM (triton), 8x2048, fwd+bwd": _profile_entry(6.4, 7.6, {"a": 100, "b": 43}),
        "layer fla GatedDeltaNet, 8x2048, fwd+bwd": _profile_entry(3.2, 7.8, {"c": 92}),
        "layer mom_lit MoM (triton), 2x8192, fwd+bwd": _profile_entry(6.5, 7.0, {"a": 143}),
        "model mom_lit MoM (triton), 8x2048, training step": _profile_entry(99.0, 101.0, {"a": 1800}),
        "model fla GatedDeltaNetForCausalLM, 8x2048, training step": _profile_entry(66.0, 140.0, {"c": 1100}),
    }
    summary = load_tool("bench_layer").summarize_profiles(table).splitlines()
    assert summary[2] == "| layer mom_lit MoM (triton) | 8x2048 | 6.400 ms | 7.60 ms | 143 | 2.00x |"
    assert summary[3].endswith("| 92 | 1.00x |")
    assert summary[4].endswith("| 6.500 ms | 7.00 ms | 143 | - |")  # no fla row at 2 x 8192
    assert summary[5].endswith("| 1800 | 1.50x |")  # models against fla's model, not its layer
    with pytest.raises(ValueError, match="not a profile"):
        load_tool("bench_layer").summarize_profiles({"layer x": _profile_entry(1.0, 1.0, {})})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_layer.py"), "--summarize-profiles", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--summarize-profiles" in proc.stderr


def test_bench_kernels_variants_one_or_several(tmp_path):
    """--variant-json takes one object or a list: each becomes the settings in use with its fields replaced."""
    bench_kernels = _bench_kernels()
    from mom_lit.ops.scan.triton.scan import Launch, LaunchConfig

    base = LaunchConfig()
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"wy_solve": {"num_warps": 1, "num_stages": 2}}))
    configs = bench_kernels.load_variants(str(one), base)
    assert list(configs) == ["in use", "variant 1"] and configs["in use"] is base
    assert configs["variant 1"].wy_solve == Launch(1, 2) and configs["variant 1"].dqk == base.dqk
    several = tmp_path / "several.json"
    several.write_text(json.dumps([{"wy_solve": {"num_warps": 4, "num_stages": 2}}, {"state_block_v": 16}]))
    configs = bench_kernels.load_variants(str(several), base)
    assert list(configs) == ["in use", "variant 1", "variant 2"]
    assert configs["variant 1"].wy_solve == Launch(4, 2) and configs["variant 2"].state_block_v == 16


def test_bench_kernels_sweep_picks_each_pass_its_own_setting(monkeypatch):
    """--sweep keeps the fastest setting of every kernel; each sequential pass (forward, recomputation, backward: a
    kernel name each) gets its own warps, stages and V-block; the tile widths stay those of the settings it started
    from."""
    bench_kernels = _bench_kernels()
    from mom_lit.ops.scan.triton.scan import DEFAULT_LAUNCH, Launch

    fastest = {"state_fwd": (4, 1, 16), "state_recompute": (8, 2, 64), "state_bwd": (4, 2, 32)}

    def kernel_times(inputs, cfg, reps=3):
        times = {f"{name}_kernel": (1.0 + getattr(cfg, name).num_warps / 100, 1)
                 for name in bench_kernels.CHUNK_KERNELS}
        for name, best in fastest.items():
            launch = getattr(cfg, name)
            setting = (launch.num_warps, launch.num_stages, launch.block_v or cfg.state_block_v)
            times[f"{name}_kernel"] = (0.5 if setting == best else 0.9, 1)
        return times

    monkeypatch.setattr(bench_kernels, "kernel_times", kernel_times)
    cfg, lines = bench_kernels.sweep(None, DEFAULT_LAUNCH)
    assert cfg.state_fwd == Launch(4, 1, block_v=16) and cfg.state_recompute == Launch(8, 2, block_v=64)
    assert cfg.state_bwd == Launch(4, 2, block_v=32) and cfg.state_block_v == DEFAULT_LAUNCH.state_block_v
    assert cfg.dqk.num_warps == 4 and cfg.dqk.block_k == DEFAULT_LAUNCH.dqk.block_k  # tile widths kept
    assert "| state_recompute | 8,2,64 | 0.500 |" in "\n".join(lines)


@pytest.mark.parametrize("text, message", [('{"wy_solv": {"num_warps": 1}}', "wy_solv"),
                                           ('[{"dqk": {"num_warps": 4, "num_stages": 2}}, 3]', "variant 2"),
                                           ('{"dqk": {"num_warps": 4, "stages": 2}}', "stages"),
                                           ("{not json", "Expecting")])
def test_bench_kernels_rejects_a_bad_variant_file_before_any_work(text, message, tmp_path):
    path = tmp_path / "variant.json"
    path.write_text(text)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--variant-json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--variant-json" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


def test_bench_kernels_reports_a_variant_that_does_not_build(tmp_path, monkeypatch):
    """A variant whose kernels do not build (shared memory, registers) is named with its error; the others are still
    compared. A failing setting in use is an error of the run."""
    bench_kernels = _bench_kernels()
    from mom_lit.ops.scan.triton.scan import DEFAULT_LAUNCH

    path = tmp_path / "variants.json"
    path.write_text(json.dumps([{"state_block_v": 16},
                                {"state_fwd": {"num_warps": 8, "num_stages": 3, "block_v": 64}}]))

    def kernel_times(inputs, cfg):
        if cfg.state_fwd.block_v == 64:
            raise RuntimeError("out of resource: shared memory, Required: 314376")
        return {"state_fwd_kernel": (0.5 if cfg.state_block_v == 16 else 0.6, 1)}

    monkeypatch.setattr(bench_kernels, "kernel_times", kernel_times)
    lines = bench_kernels.compare_variants(None, str(path), DEFAULT_LAUNCH, errors=False)
    assert "variant 1: state_block_v=16" in lines
    assert any(line.startswith("variant 2: state_fwd=Launch(num_warps=8, num_stages=3")
               and "did not run: RuntimeError: out of resource" in line for line in lines)
    assert "| kernel (ms per fwd+bwd) | in use | variant 1 |" in lines
    assert "| state_fwd_kernel | 0.600 | 0.500 |" in lines
    monkeypatch.setattr(bench_kernels, "kernel_times", lambda inputs, cfg: (_ for _ in ()).throw(RuntimeError("no")))
    with pytest.raises(RuntimeError):
        bench_kernels.compare_variants(None, str(path), DEFAULT_LAUNCH, errors=False)


def test_sdpa_baseline_decodes_through_its_kv_cache_as_it_attends_causally():
    """The benchmarks' SDPA attention: a prefill into the KV cache, then one token at a time (at a python position
    over the filled part, or at a device position over the whole buffer under a mask) gives the outputs of causal
    attention over the whole sequence."""
    import torch

    benchlib = load_tool("benchlib")
    torch.manual_seed(0)
    attn = benchlib.SDPAAttention(32, heads=4)
    batch, seq_len, prefill, max_len = 2, 9, 5, 12
    x = torch.randn(batch, seq_len, 32)
    angles = torch.arange(max_len).float()[:, None] * torch.rand(4)  # (max_len, hd/2)
    cos, sin = angles.cos(), angles.sin()
    with torch.no_grad():
        full = attn(x, rope=(cos[:seq_len], sin[:seq_len]))
        for masked in (False, True):
            cache = tuple(torch.zeros(batch, 4, max_len, 8) for _ in range(2))  # (B, nh, max_len, hd)
            steps = [attn(x[:, :prefill], rope=(cos[:prefill], sin[:prefill]), cache=cache, start=0)]
            for t in range(prefill, seq_len):
                rope = (cos[t:t + 1], sin[t:t + 1])
                if masked:
                    steps.append(attn(x[:, t:t + 1], rope=rope, cache=cache, start=None, pos=torch.tensor([t])))
                else:
                    steps.append(attn(x[:, t:t + 1], rope=rope, cache=cache, start=t))
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

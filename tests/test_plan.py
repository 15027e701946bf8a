"""The execution plan: every path of the MoM layer chosen in one place from the config, the device and the dtype,
and overridden per model without touching the config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.ops.slots.grouped import grouped_mm_available
from mom_lit.plan import resolve_plan
from mom_lit.training.flops import scan_flops_per_token, training_flops_per_token


def test_plan_follows_the_config_fields():
    """Every path is one field of the plan, chosen from the config, the device and the dtype."""
    base = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_memories=4, topk=2, num_layers=1)
    cpu = resolve_plan(base, "cpu", torch.float32)
    assert (cpu.scan, cpu.slots, cpu.mix, cpu.decode) == ("compiled", "eager", "torch", "torch")
    assert base.chunk_size is None and cpu.chunk_size == 32  # the plan's choice for 16-wide heads
    forced = resolve_plan(dataclasses.replace(base, backend="triton", stages="triton", activation_memory="lean"),
                          "cpu", torch.float32)
    assert (forced.scan, forced.mix, forced.decode, forced.scan_recompute) == ("triton", "triton", "triton", "wy")
    assert forced.chunk_size == 64  # the Triton tile
    assert forced.slots == ("grouped" if grouped_mm_available("cpu", torch.float32, 32, 80) else "gathered")
    dense = resolve_plan(dataclasses.replace(base, stages="triton", projections="dense"), "cpu", torch.float32)
    assert dense.slots == "gathered"
    assert resolve_plan(dataclasses.replace(base, stages="triton", conv_size=0), "cpu", torch.float32).slots == "eager"
    assert resolve_plan(dataclasses.replace(base, stages="triton"), "cpu", torch.float64).mix == "torch"
    gla = resolve_plan(dataclasses.replace(base, update_rule="gla"), "cpu", torch.float32)
    assert gla.decode == "torch" and gla.scan == "compiled"
    with pytest.raises(ValueError, match="scan_recompute"):
        resolve_plan(base, "cpu", torch.float32, scan_recompute="all")
    assert cpu.blocks == "eager"  # the compiled bodies by default on CUDA only
    assert resolve_plan(base, "cpu", torch.float32, compile_blocks=True).blocks == "compiled"
    with pytest.raises(ValueError, match="compile_blocks"):
        resolve_plan(base, "cpu", torch.float32, compile_blocks="yes")


def test_chunk_size_drives_the_chunked_scan_or_is_rejected_by_triton():
    """The Triton scan's tile is fixed: an explicit Triton backend with another chunk length is an error naming the
    field; the chunked reference runs the configured one; the FLOP count takes the chunk length that runs."""
    cfg = MoMConfig(hidden_size=32, num_heads=2, head_dim=16, num_layers=1, chunk_size=16)
    with pytest.raises(ValueError, match="MoMConfig.chunk_size=16"):
        resolve_plan(dataclasses.replace(cfg, backend="triton"), "cpu", torch.float32)
    assert resolve_plan(dataclasses.replace(cfg, backend="eager"), "cpu", torch.float32).chunk_size == 16
    assert scan_flops_per_token(cfg, 64) - scan_flops_per_token(cfg) == cfg.num_layers * 3 * cfg.num_heads * 2 * 48 * 32
    assert training_flops_per_token(cfg, 16) == training_flops_per_token(cfg)


@pytest.mark.parametrize(("head_dim", "expand_v", "chunk"), [(16, 1.0, 32), (32, 1.0, 32), (32, 2.0, 64), (64, 1.0, 64)])
def test_unset_chunk_size_is_the_plans_choice_for_the_head_dims(head_dim, expand_v, chunk):
    """chunk_size=None: the chunked reference runs 32 for heads at most 32 wide (keys and values) and 64 for wider
    ones; the Triton scan its tile; the FLOP count without an explicit chunk takes the reference's."""
    cfg = MoMConfig(hidden_size=64, num_heads=2, head_dim=head_dim, expand_v=expand_v, num_layers=1)
    assert resolve_plan(cfg, "cpu", torch.float32).chunk_size == chunk
    assert resolve_plan(dataclasses.replace(cfg, backend="eager"), "cpu", torch.float32).chunk_size == chunk
    assert resolve_plan(dataclasses.replace(cfg, backend="triton"), "cpu", torch.float32).chunk_size == 64
    assert scan_flops_per_token(cfg) == scan_flops_per_token(cfg, chunk)
    assert resolve_plan(dataclasses.replace(cfg, chunk_size=8), "cpu", torch.float32).chunk_size == 8


def test_path_overrides_leave_the_config_alone():
    model = MoMForCausalLM(MoMConfig.from_preset("debug"))
    config = dataclasses.replace(model.config)
    model.configure_paths(backend="eager", stages="reference")
    assert model.config == config
    assert "scan=eager" in model.describe_paths()
    model.configure_paths(compile_blocks=True)
    assert "blocks=compiled" in model.describe_paths()
    with pytest.raises(ValueError, match="unknown path overrides"):
        model.configure_paths(num_layers=8)
    with pytest.raises(ValueError, match="MoMConfig.stages"):
        model.configure_paths(stages="fast")


def test_auto_runs_the_eager_scan_where_torch_compile_has_no_cpu_compiler(tmp_path):
    """A machine without a C++ compiler: ``backend="auto"`` resolves to the eager chunked scan (said in the log),
    ``backend="compiled"`` keeps what was asked for."""
    script = textwrap.dedent("""
        import torch
        from mom_lit import MoMConfig
        from mom_lit.plan import cpu_compiler_available, resolve_plan
        config = dict(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, head_dim=8, num_memories=2, topk=1)
        print(cpu_compiler_available(),
              resolve_plan(MoMConfig(**config), "cpu", torch.float32).scan,
              resolve_plan(MoMConfig(**config, backend="compiled"), "cpu", torch.float32).scan)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = str(tmp_path)  # no compiler on it
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "eager", "compiled"]
    assert "no C++ compiler for torch.compile" in proc.stderr

"""The MQAR sweep (tools/mqar_sweep.py) and its plots (tools/plot_mqar.py): variants, plan, lr choice, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tools_import import load_tool

from mom_lit.config import MoMConfig
from mom_lit.training.flops import active_streams

ROOT = Path(__file__).parents[1]


sweep = load_tool("mqar_sweep")
plot = load_tool("plot_mqar")


def _state(name: str) -> tuple[int, int]:
    """(total, active) recurrent state per layer of a variant at the shape of configs/mqar.yaml."""
    v = sweep.VARIANTS[name]
    c = MoMConfig(hidden_size=128, num_layers=2, num_heads=2, head_dim=32, num_memories=v.num_memories, topk=v.topk,
                  shared_memory=v.shared_memory, expand_v=v.expand_v)
    per_stream = c.num_heads * c.head_dim * c.head_v_dim
    return c.num_streams * per_stream, active_streams(c) * per_stream


def test_baselines_match_mom_state() -> None:
    mom_total, mom_active = _state("mom")
    assert _state("gdn_total") == (mom_total, mom_total)
    assert _state("gdn_active") == (mom_active, mom_active)
    assert mom_active < mom_total


def test_memory_count_variants_keep_activation_ratio_half() -> None:
    names = sweep.GROUPS["memories"]
    seen = set()
    for name in names:
        v = sweep.VARIANTS[name]
        assert v.expand_v == 1.0
        assert v.topk == max(1, v.num_memories // 2), name
        seen.add((v.num_memories, v.shared_memory))
    assert seen == {(e, s) for e in (1, 2, 4, 8) for s in (True, False)}


def test_expand_variants_resolves_groups_and_rejects_unknown_names() -> None:
    assert sweep.expand_variants(["compare", "mom", "e2"]) == ["mom", "gdn_total", "gdn_active", "e2"]
    assert len(sweep.expand_variants(["all"])) == len(sweep.VARIANTS)
    with pytest.raises(ValueError, match="unknown name 'gdn'"):
        sweep.expand_variants(["gdn"])


def _args(*extra: str):
    return sweep.parse_args(["--out", "x.json", *extra])


def test_plan_is_seed_major_and_every_variant_of_a_seed_gets_the_same_data() -> None:
    args = _args("--variants", "compare", "--seeds", "0", "1", "--lrs", "1e-3", "3e-3", "--seq_lens", "256", "512")
    runs = sweep.plan_runs(args)
    assert len(runs) == 3 * 2 * 2 * 2 and len({r["run_id"] for r in runs}) == len(runs)
    assert [r["seed"] for r in runs] == sorted(r["seed"] for r in runs), "a time budget cuts whole later seeds"
    settings = vars(args) | {"run_dir": "/tmp/x", "precision": "32-true"}

    def data_args(run: dict) -> list[str]:
        return [a for a in sweep.cli_args(run, settings, None) if a.startswith(("--data.", "--seed_everything"))]

    for seed in (0, 1):
        for seq_len in (256, 512):
            same = [data_args(r) for r in runs if r["seed"] == seed and r["seq_len"] == seq_len]
            assert all(d == same[0] for d in same), "the data (and seed) differ between variants"
    assert data_args(runs[0]) != data_args(runs[-1])


def test_parse_args_names_bad_values() -> None:
    for bad, message in [(["--variants", "nope"], "unknown name 'nope'"), (["--steps", "0"], "--steps must be >= 1"),
                         (["--set=--model.lr=1"], "without leading dashes"),
                         (["--time_budget_s", "-1"], "--time_budget_s must be positive")]:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "mqar_sweep.py"), "--out", "x.json", *bad],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def _run(variant: str, lr: float, seed: int, val: float, test: float, **extra) -> dict:
    v = sweep.VARIANTS[variant]
    return {"variant": variant, "num_memories": v.num_memories, "topk": v.topk, "shared_memory": v.shared_memory,
            "expand_v": v.expand_v, "seq_len": 256, "seed": seed, "lr": lr, "status": "done",
            "val_acc": {"16": val, "32": val}, "test_acc": {"16": test, "32": test},
            "state_per_layer": 10240, "active_state_per_layer": 6144, "params": 1000} | extra


def test_lr_is_chosen_on_validation_not_test() -> None:
    runs = [_run("mom", 1e-3, s, val=0.6, test=0.1) for s in (0, 1)]
    runs += [_run("mom", 3e-3, s, val=0.2, test=0.9) for s in (0, 1)]
    assert plot.select_lr(runs) == {("mom", 256): 1e-3}
    best = plot.best_runs(runs)[("mom", 256)]
    assert {r["lr"] for r in best} == {1e-3} and len(best) == 2


def test_lr_with_missing_seeds_does_not_compete() -> None:
    runs = [_run("mom", 1e-3, s, val=0.5, test=0.5) for s in (0, 1, 2)]
    runs.append(_run("mom", 3e-3, 0, val=0.9, test=0.9))  # its seeds 1 and 2 did not finish
    assert plot.select_lr(runs) == {("mom", 256): 1e-3}


def test_table_reports_seed_spread() -> None:
    runs = [_run("mom", 1e-3, 0, val=0.5, test=0.2), _run("mom", 1e-3, 1, val=0.5, test=0.6)]
    row = plot.table(plot.best_runs(runs)).splitlines()[-1]
    assert "| mom | 4 | 2 | yes | 256 | 10,240 (6,144) |" in row and "0.400 [0.200, 0.600]" in row


def test_time_budget_reports_runs_as_not_run(tmp_path) -> None:
    """A budget too small for any run: nothing trains, every run is listed as not run."""
    out = tmp_path / "s.json"
    sweep.main(["--out", str(out), "--run_dir", str(tmp_path / "runs"), "--variants", "mom", "e1", "--seq_lens", "32",
                "--kv_pairs", "2", "--vocab_size", "64", "--steps", "2", "--seeds", "0", "--lrs", "3e-3",
                "--batch_size", "4", "--workers", "1", "--time_budget_s", "0.001"])
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["status"], r["reason"]) for r in runs] == [("mom", "not_run", "time budget"),
                                                                       ("e1", "not_run", "time budget")]


@pytest.mark.slow
def test_sweep_to_json_to_plot_end_to_end(tmp_path) -> None:
    """Two tiny runs through worker processes and the CLI, their summary, the table and both plots."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "tools" / "mqar_sweep.py"), "--out", str(out), "--run_dir", str(tmp_path / "r"),
           "--variants", "mom", "e1", "--seq_lens", "32", "--kv_pairs", "2", "4", "--vocab_size", "64", "--steps", "6",
           "--seeds", "0", "--lrs", "3e-3", "--batch_size", "8", "--val_examples", "8", "--test_examples", "8",
           "--workers", "2", "--set", "model.config.backend=eager", "model.config.hidden_size=32",
           "model.config.head_dim=8", "model.config.chunk_size=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    runs = {r["variant"]: r for r in summary["runs"]}
    assert set(runs) == {"mom", "e1"}
    for r in runs.values():
        assert r["status"] == "done", r.get("traceback", r)
        assert r["steps"] == 6 and r["seed"] == 0 and r["seq_len"] == 32
        assert set(r["val_acc"]) == set(r["test_acc"]) == {"2", "4"}
        assert all(0.0 <= a <= 1.0 for a in [*r["val_acc"].values(), *r["test_acc"].values()])
        assert r["params"] > 0 and r["wall_s"] > 0
    # hidden 32, 2 heads x 8 x 8 per memory: mom stores 4 + 1 memories and uses 2 + 1, e1 one.
    assert (runs["mom"]["state_per_layer"], runs["mom"]["active_state_per_layer"]) == (5 * 128, 3 * 128)
    assert (runs["e1"]["state_per_layer"], runs["e1"]["active_state_per_layer"]) == (128, 128)
    assert out.stat().st_size < 2_000_000

    acc_png, mem_png = tmp_path / "acc.png", tmp_path / "mem.png"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_mqar.py"), str(out), "--acc_png", str(acc_png),
                           "--memories_png", str(mem_png)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| mom | 4 | 2 | yes | 32 |" in proc.stdout and "| e1 | 1 | 1 | no | 32 |" in proc.stdout
    assert acc_png.stat().st_size > 0 and mem_png.stat().st_size > 0


def test_a_failing_run_is_recorded_with_its_error(tmp_path) -> None:
    """A run the model rejects (top-k above the number of memories) comes back as failed, naming the field."""
    args = _args("--variants", "mom", "--seq_lens", "32", "--kv_pairs", "2", "--vocab_size", "64", "--steps", "2",
                 "--batch_size", "4", "--set", "model.config.topk=8", "model.config.backend=eager")
    settings = vars(args) | {"run_dir": str(tmp_path), "precision": "32-true"}
    record = sweep.train_one(sweep.plan_runs(args)[0], settings, None)
    assert record["status"] == "failed" and "topk=8 exceeds num_memories=4" in record["error"], record
    assert "steps" not in record and record["wall_s"] >= 0

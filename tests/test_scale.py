"""Multi-node launch on CPU (two single-process "nodes" from torchrun-style variables) and tools/scale_runs.py."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tools_import import load_tool
import torch

REPO = Path(__file__).resolve().parents[1]
scale_runs = load_tool("scale_runs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_each_on_cpu(tmp_path):
    """``trainer.num_nodes=2, devices=1`` under the variables torchrun gives each node's process: one run of
    world size 2 in which the node ranks become the global ranks, ranks read different rows and end equal."""
    steps, batch, seq_len = 3, 4, 32
    args = [
        sys.executable, "-m", "mom_lit", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--config", str(REPO / "configs" / "ddp.yaml"),
        "--trainer.accelerator=cpu", "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.precision=32-true",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=2", f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.callbacks+=test_ddp.RecordRank", f"--trainer.callbacks.out_dir={tmp_path}",
        "--trainer.callbacks+=scale_runs.ScaleProbe", f"--trainer.callbacks.out_dir={tmp_path}",
        "--trainer.callbacks.warmup_steps=1",
        "--model.config.hidden_size=32", "--model.config.num_layers=2", "--model.config.head_dim=8",
        "--model.config.chunk_size=16", "--model.config.backend=eager", "--model.warmup_steps=1",
        f"--data.init_args.seq_len={seq_len}", f"--data.init_args.batch_size={batch}",
        "--data.init_args.num_workers=0",
    ]
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO / "tools"), os.environ.get("PYTHONPATH")]))
    common = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
              "TORCHELASTIC_RUN_ID": "two-nodes"}
    procs = [subprocess.Popen(args, cwd=tmp_path, env={**common, "RANK": str(node), "GROUP_RANK": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    rows = [{tuple(row.tolist()) for b in r["batches"] for row in b} for r in ranks]
    assert len(rows[0]) == len(rows[1]) == steps * batch and not rows[0] & rows[1]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    assert not torch.equal(ranks[0]["state"]["embed.weight"], ranks[0]["initial"]["embed.weight"])

    probe = json.loads((tmp_path / scale_runs.PROBE_FILE).read_text())
    assert (probe["num_nodes"], probe["devices_per_node"], probe["world_size"]) == (2, 1, 2)
    assert probe["strategy"] == "MoMDDPStrategy" and len(probe["step_losses"]) == steps
    assert all(t == (steps - 1) * batch * seq_len for t in probe["timed_tokens_per_rank"])  # after 1 warm-up step
    # The step-time breakdown: data wait and DDP's exposed all-reduce time are parts of the step time.
    for step, data, comm in zip(probe["step_seconds_per_rank"], probe["data_wait_seconds_per_step_per_rank"],
                                probe["exposed_communication_seconds_per_step_per_rank"]):
        assert 0 <= data < step and 0 <= comm < step
    assert probe["val_loss"] is not None


def test_scale_runs_keep_the_global_batch_and_launch_as_documented(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert scale_runs.main(["--dry_run", "--out", str(tmp_path), "--runs", ",".join(scale_runs.RUNS)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs: dict[str, list[list[str]]] = {}
    for line in lines:
        name, command = line.split(" ", 1)
        runs.setdefault(name.strip("[]"), []).append(shlex.split(command))
    assert set(runs) == set(scale_runs.RUNS)
    for name, commands in runs.items():
        for words in commands:
            opts = dict(w[2:].split("=", 1) for w in words if w.startswith("--trainer.") or w.startswith("--data."))
            rows = (int(opts["data.init_args.batch_size"]) * int(opts["trainer.accumulate_grad_batches"])
                    * int(opts["trainer.devices"]) * int(opts["trainer.num_nodes"]))
            assert rows == 64, name  # the default: the paper's 8 rows per GPU on 8 GPUs
            # validation once, at the last optimizer step
            assert int(opts["trainer.val_check_interval"]) == (int(opts["trainer.max_steps"])
                                                               * int(opts["trainer.accumulate_grad_batches"]))
    assert [w for w in runs["1gpu"][0] if w.startswith("CUDA_VISIBLE_DEVICES")] == ["CUDA_VISIBLE_DEVICES=0"]
    agents = runs["2node"]
    assert [a[0] for a in agents] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
    for agent in agents:
        assert {"--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"} <= set(agent)
    endpoints = {w for a in agents for w in a if w.startswith("--rdzv-endpoint=")}
    assert len(endpoints) == 1  # both agents meet at one rendezvous
    assert any(w.endswith("configs/fsdp.yaml") for w in runs["fsdp"][0])
    assert any(w.endswith("configs/mom_340m.yaml") for w in runs["1gpu"][0])
    assert "--trainer.strategy=auto" in runs["1gpu"][0]  # the 1-GPU baseline is not a DDP run of one rank
    assert [int(dict(w[2:].split("=", 1) for w in runs[n][0] if w.startswith("--trainer."))["trainer.devices"])
            for n in ("1gpu", "ddp", "ddp4", "ddp8")] == [1, 2, 4, 8]
    # FSDP2's data-parallel mesh spans both ranks (Lightning refuses one that does not cover the world)
    assert "--trainer.strategy.init_args.data_parallel_size=2" in runs["fsdp2"][0]


def test_scale_runs_use_the_gpus_they_are_given(tmp_path, capsys, monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=3,5 the runs use cards 3 and 5 (two 1-GPU runs can share a host), and a run
    that needs more cards than are visible stops before launching anything."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert scale_runs.main(["--dry_run", "--out", str(tmp_path), "--runs", "1gpu,fsdp,2node"]) == 0
    env = [line.split()[:2] for line in capsys.readouterr().out.strip().splitlines()]
    assert env == [["[1gpu]", "CUDA_VISIBLE_DEVICES=3"], ["[fsdp]", "CUDA_VISIBLE_DEVICES=3,5"],
                   ["[2node]", "CUDA_VISIBLE_DEVICES=3"], ["[2node]", "CUDA_VISIBLE_DEVICES=5"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(SystemExit, match="needs 2 GPUs"):
        scale_runs.main(["--out", str(tmp_path), "--runs", "ddp", "--steps", "1"])


def test_scale_runs_reject_a_global_batch_that_does_not_split(tmp_path):
    with pytest.raises(ValueError, match="not a multiple"):
        scale_runs.main(["--dry_run", "--out", str(tmp_path), "--global_batch", "12"])


def test_fsdp_clips_through_the_root_module():
    """Lightning's FSDP precision plugin cannot clip by norm; the module hands the clip to the FSDP root, whose
    norm covers every rank's shard (FSDP itself needs an accelerator, so a stand-in plays the root here)."""
    from types import SimpleNamespace

    from mom_lit import MoMConfig
    from mom_lit.training import module as module_lib

    from torch.distributed.fsdp import FullyShardedDataParallel

    calls = []

    class Root(FullyShardedDataParallel):
        """An FSDP root without the process group FSDP needs: only its norm clipping is called."""

        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)

    root = Root.__new__(Root)  # FSDP's own __init__ needs an initialised process group
    lm = module_lib.MoMLightningModule(MoMConfig.from_preset("debug"))
    lm._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    lm.configure_gradient_clipping(None, 0.5, "norm")
    lm.configure_gradient_clipping(None, 0.25, None)  # Lightning passes None when no algorithm is set
    assert calls == [0.5, 0.25]


@pytest.mark.parametrize("strategy,compiled", [("FSDPStrategy", False), ("DDPStrategy", True)])
def test_fsdp_turns_off_compiled_layer_stages(strategy, compiled):
    """Under FSDP the layers' parameters are views of a flat parameter that torch.compile cannot trace (this
    crashed the first FSDP run on GPUs in a checkpointed block's recompute): the module turns the layers' compiled
    stages off under Lightning's FSDP strategy and leaves them on otherwise."""
    from types import SimpleNamespace

    from mom_lit import MoMConfig
    from mom_lit.training import module as module_lib

    lm = module_lib.MoMLightningModule(MoMConfig.from_preset("debug"))
    from lightning.pytorch import strategies

    lm._trainer = SimpleNamespace(strategy=getattr(strategies, strategy)())
    lm.configure_model()
    assert lm.model.config.compile_stages  # the config is left as it is
    assert lm.model.plans.config.compile_stages is compiled
    assert lm.model.plan_for("cpu").cached_slots == "eager"  # compiled stages are for CUDA only anyway


def test_optimizer_on_cuda_lets_lightning_clip_under_mixed_precision():
    """Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales them itself
    (a fused AdamW), and every bf16-mixed config clips: the optimizer chosen for a CUDA module must not be one."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    from mom_lit import MoMConfig
    from mom_lit.training.module import MoMLightningModule

    lm = MoMLightningModule(MoMConfig.from_preset("debug"), warmup_steps=1)
    lm._device = torch.device("cuda")  # what the module sees on a GPU; the parameters may stay on the CPU here
    lm._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = lm.configure_optimizers()["optimizer"]
    assert not _optimizer_handles_unscaling(optimizer)


def test_scale_runs_table_splits_the_step_and_compares_to_the_first_run(tmp_path):
    """The results table from two runs' probes: tokens/s per GPU as a share of the first run's, the step split
    into data, communication not overlapped and compute (the rest), and the loss at a fixed step."""
    rows = []
    for name, tokens, comm in (("1gpu", 1000.0, float("nan")), ("ddp", 900.0, 0.010)):
        (tmp_path / name).mkdir()
        probe = {"step_losses": [3.0, 2.5, 2.0 if name == "1gpu" else 2.25], "tokens_per_sec_per_rank": [tokens],
                 "peak_allocated_gib_per_rank": [1.0], "step_seconds_per_rank": [0.100],
                 "data_wait_seconds_per_step_per_rank": [0.005],
                 "exposed_communication_seconds_per_step_per_rank": [comm], "steps": 3,
                 "accumulate_grad_batches": 1, "val_loss": None}
        (tmp_path / name / scale_runs.PROBE_FILE).write_text(json.dumps(probe))
        rows.append(scale_runs.summarise(name, scale_runs.RUNS[name], {"exit_codes": [0], "wall_s": 1.0}, tmp_path,
                                         tail=2, global_batch=8, seq_len=16, compare_step=3))
    assert rows[0]["compute_ms"] == pytest.approx(95.0) and rows[1]["compute_ms"] == pytest.approx(85.0)
    table = scale_runs.write_results(rows, tmp_path, "header")
    ddp = next(line for line in table.splitlines() if line.startswith("| ddp "))
    cells = [c.strip() for c in ddp.strip("|").split("|")]
    assert cells[9:13] == ["2.2500 (step 3)", "+0.25000", "900", "90.0%"]
    assert cells[14:18] == ["100.0 ms", "5.0 ms", "10.0 ms", "85.0 ms"]
    one = next(line for line in table.splitlines() if line.startswith("| 1gpu "))
    assert [c.strip() for c in one.strip("|").split("|")][16] == "-"  # no DDP timers on one process

#!/usr/bin/env python
"""Train one config on 1, 2, 4 and 8 GPUs (DDP), and with FSDP or two single-GPU "nodes", at one global batch.

Runs, each through the command line (``python -m mom_lit fit``) and with the same global batch of
``--global_batch`` rows (the config's ``data.batch_size`` rows per GPU and micro-batch, gradient accumulation
making up the rest):

* ``1gpu``: one process, ``trainer.devices=1``, ``trainer.strategy=auto`` (no DDP wrapper);
* ``ddp``, ``ddp4``, ``ddp8``: ``--config configs/ddp.yaml`` (static graph, gradients as bucket views) with
  ``trainer.devices`` 2, 4, 8; Lightning starts the other processes;
* ``fsdp``: ``--config configs/fsdp.yaml`` (FSDP1, full sharding, every block recomputed) under
  ``torchrun --standalone --nproc-per-node 2``;
* ``fsdp2``: ``--config configs/fsdp2.yaml`` (``fully_shard`` per block, every block recomputed) on 2 GPUs;
* ``2node``: ``--config configs/ddp.yaml`` with ``trainer.num_nodes=2 trainer.devices=1``, launched as two
  ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint localhost:PORT`` agents on this
  host, one GPU each (``CUDA_VISIBLE_DEVICES`` 0 and 1).

The default is the paper's 340M recipe at its per-GPU batch (``configs/mom_340m.yaml``: 8 rows of 2048 tokens
per GPU, 64 rows per step over 1, 2, 4 and 8 GPUs, the 1-GPU run accumulating 8 micro-batches). A run that
needs more GPUs than are visible stops the script before anything is launched.

The runs take the GPUs of this script's ``CUDA_VISIBLE_DEVICES`` in order (all of the host's when it is unset), so
two 1-GPU runs can share a host: ``CUDA_VISIBLE_DEVICES=1 python tools/scale_runs.py --runs 1gpu ...``.

Each run's process logs go to ``<out>/<run>.log`` and its CSV metrics to ``<out>/<run>/``. A :class:`ScaleProbe`
callback measures, on every rank, after ``--warmup_steps`` optimizer steps (compilation excluded; synchronised at
both ends): the tokens/s of that rank, the step time and its breakdown, the peak CUDA memory allocated; and the
loss of every optimizer step over the whole global batch (the micro-batch losses summed over accumulation and
averaged over ranks, so runs of different layouts compare step by step). The breakdown of an optimizer step:

* data: host time between the end of one micro-batch and the start of the next (the loader's ``next`` and the
  copy to the device), summed over the step's micro-batches; the loader is no bottleneck when it is small;
* communication not overlapped (DDP only): DDP's own timers, sampled by torch on some iterations: all-reduce
  time minus the part overlapped with the backward computation, once per optimizer step (accumulating
  micro-batches do not reduce);
* compute: the rest of the step time.

The rows of an optimizer step are the same set for every layout only within an epoch resumed on another
number of GPUs: litdata deals a fresh epoch by rank, so runs of different GPU counts train on differently
composed global batches, and (with a load-balancing loss computed per rank) their losses agree only to the
noise of that composition; runs of the same GPU count (``ddp``, ``fsdp2``) see the same rows.

The table goes to ``<out>/results.md`` (and ``results.json``, ``step_losses.csv``): final train loss (mean of the
last ``--tail`` steps, with the standard error of that mean), the loss at ``--compare_step``, validation loss,
tokens/s per GPU and its ratio to the first run's, the breakdown, peak memory, and the differences to the first
run.

Typical use (8 GPUs, data prepared as configs/mom_340m.yaml says, repository root)::

    python tools/scale_runs.py --out runs/scale --steps 200 --warmup_steps 50

Plumbing check on a CPU (gloo processes, a tiny model on the embedded corpus)::

    python tools/scale_runs.py --cpu --runs 1gpu,ddp,fsdp2 --steps 4 --warmup_steps 1 --global_batch 8 \\
        --tail 2 --out /tmp/scale --set model.config.hidden_size=32 --set model.config.num_layers=2 \\
        --set model.config.head_dim=8 --set model.config.backend=eager --set model.warmup_steps=1 \\
        --set data.init_args.seq_len=32 --set data.init_args.num_workers=0 --set data.init_args.batch_size=2 \\
        --set data.init_args.data_dir=null --set data.init_args.tokenizer=byte --set trainer.limit_val_batches=2

``--dry_run`` prints the commands without running them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PROBE_FILE = "probe.json"


class ScaleProbe(L.Callback):
    """Per-rank tokens/s, step-time breakdown and peak memory, and the loss of each optimizer step over all ranks;
    rank 0 writes ``<out_dir>/probe.json`` at the end of training.

    Args:
        out_dir: where ``probe.json`` goes.
        warmup_steps: optimizer steps left out of the throughput (compilation, autotuning, allocator warm-up).
    """

    def __init__(self, out_dir: str, warmup_steps: int = 20):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.out_dir = Path(out_dir)
        self.warmup_steps = warmup_steps
        self._losses: list[torch.Tensor] = []
        self._start: float | None = None
        self._end: float | None = None
        self._tokens = 0  # this rank's tokens after the start mark
        self._batch_end: float | None = None  # host clock at the end of the previous micro-batch
        self._data_wait = 0.0  # host seconds between micro-batches after the start mark
        self._timed_batches = 0
        self._comm = CommunicationMeter()

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._comm.attach(trainer.strategy.model)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._start is not None and self._end is None and self._batch_end is not None:
            # The loader's next() and the copy to the device since the last micro-batch ended (host time).
            self._data_wait += time.perf_counter() - self._batch_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning hands over the micro-batch loss already divided by accumulate_grad_batches.
        self._losses.append(outputs["loss"].detach().float())
        if self._end is not None:
            return
        if self._start is None:
            if trainer.global_step >= self.warmup_steps:
                self._start = self._now(pl_module.device)
                self._batch_end = time.perf_counter()
                self._comm.skip_seen()
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:  # DDP synchronises on this micro-batch only
            self._comm.poll()
        self._tokens += batch["input_ids"].numel()
        self._timed_batches += 1
        self._batch_end = time.perf_counter()
        step = trainer.global_step
        if trainer.is_global_zero and step % 50 == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            # A sign of life in the log, also for a run that is stopped before it ends.
            print(f"step {step}: {time.perf_counter() - self._start:.1f} s since step {self.warmup_steps}",
                  flush=True)
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self._end = self._now(pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_end: by then the strategy's teardown has moved the module to the CPU, where CUDA peak memory
        # reads 0 and NCCL cannot gather.
        device = trainer.strategy.root_device
        accumulate = trainer.accumulate_grad_batches
        steps = len(self._losses) // accumulate
        # (steps, accumulate) micro-batch losses -> the loss of each optimizer step on this rank's share
        local = torch.stack(self._losses[:steps * accumulate]).view(steps, accumulate).sum(1)
        step_losses = trainer.strategy.reduce(local.to(device), reduce_op="mean")
        elapsed = (self._end - self._start) if self._start is not None and self._end is not None else float("nan")
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
        timed_steps = self._timed_batches / accumulate
        comm = self._comm.mean_s()
        mine = torch.tensor([self._tokens / elapsed if elapsed > 0 else float("nan"), peak / 2**30,
                             reserved / 2**30, float(self._tokens),
                             elapsed / timed_steps if timed_steps else float("nan"),
                             self._data_wait / timed_steps if timed_steps else float("nan"), comm],
                            device=device, dtype=torch.float64)
        ranks = trainer.strategy.all_gather(mine).view(-1, mine.numel()).cpu()  # (world, 7)
        # Sharded (FSDP): each rank holds a part of every parameter; replicated (DDP): each holds them all.
        local = torch.tensor(float(sum(p.numel() for p in pl_module.model.parameters())), device=device)
        sharded = "FSDP" in type(trainer.strategy).__name__
        parameters = int(trainer.strategy.reduce(local, reduce_op="sum") if sharded else local)
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/loss")
        probe = {
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "devices_per_node": trainer.num_devices, "accumulate_grad_batches": accumulate,
            "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
            "steps": steps, "warmup_steps": self.warmup_steps, "timed_seconds": elapsed,
            "tokens_per_sec_per_rank": ranks[:, 0].tolist(), "peak_allocated_gib_per_rank": ranks[:, 1].tolist(),
            "peak_reserved_gib_per_rank": ranks[:, 2].tolist(), "timed_tokens_per_rank": ranks[:, 3].tolist(),
            "step_seconds_per_rank": ranks[:, 4].tolist(), "data_wait_seconds_per_step_per_rank": ranks[:, 5].tolist(),
            "exposed_communication_seconds_per_step_per_rank": ranks[:, 6].tolist(),
            "val_loss": float(val) if val is not None else None,
            "step_losses": step_losses.float().cpu().tolist(), "parameters": parameters,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / PROBE_FILE).write_text(json.dumps(probe, indent=1))


class CommunicationMeter:
    """Seconds per synchronising backward pass during which DDP's gradient all-reduce was not hidden under the
    backward computation (all-reduce time minus its overlap), averaged over the timed iterations only.

    DDP times every iteration once its sampling rate is 1; the newest iteration's figures are read after each
    micro-batch and told apart by their start stamp, so warm-up iterations (the first all-reduce sets up the
    communicator) never enter the average. NaN for a model DDP does not wrap (one process, FSDP).
    """

    def __init__(self) -> None:
        self._model: Any = None
        self._seen: set[int] = set()  # start stamps of the iterations already read or skipped
        self._exposed_ns: list[int] = []

    def attach(self, model: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model._set_ddp_runtime_logging_sample_rate(1)
            self._model = model

    def _latest(self) -> tuple[int, int] | None:
        """(start stamp, exposed ns) of the newest timed iteration, or None before the first one."""
        if self._model is None:
            return None
        timings = self._model._get_ddp_logging_data()
        if "backward_comm_time_start" not in timings:
            return None
        exposed = timings["backward_comm_time"] - timings["backward_compute_comm_overlap_time"]
        return int(timings["backward_comm_time_start"]), max(0, int(exposed))

    def skip_seen(self) -> None:
        """Leave the iterations timed so far (the warm-up) out of the average."""
        latest = self._latest()
        if latest is not None:
            self._seen.add(latest[0])

    def poll(self) -> None:
        latest = self._latest()
        if latest is not None and latest[0] not in self._seen:
            self._seen.add(latest[0])
            self._exposed_ns.append(latest[1])

    def mean_s(self) -> float:
        return sum(self._exposed_ns) / len(self._exposed_ns) / 1e9 if self._exposed_ns else float("nan")


@dataclass(frozen=True)
class Run:
    name: str
    num_nodes: int
    devices: int  # per node
    overlay: str | None  # a config laid over the base one
    launcher: str  # "lightning" (Lightning starts the ranks), "torchrun" (one agent), "torchrun-nodes"
    description: str

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices


RUNS = {
    "1gpu": Run("1gpu", 1, 1, None, "lightning", "1 GPU"),
    "ddp": Run("ddp", 1, 2, "configs/ddp.yaml", "lightning", "DDP, 1 node x 2 GPUs"),
    "ddp4": Run("ddp4", 1, 4, "configs/ddp.yaml", "lightning", "DDP, 1 node x 4 GPUs"),
    "ddp8": Run("ddp8", 1, 8, "configs/ddp.yaml", "lightning", "DDP, 1 node x 8 GPUs"),
    "fsdp": Run("fsdp", 1, 2, "configs/fsdp.yaml", "torchrun", "FSDP, 1 node x 2 GPUs (torchrun)"),
    "fsdp2": Run("fsdp2", 1, 2, "configs/fsdp2.yaml", "lightning", "FSDP2 (fully_shard), 1 node x 2 GPUs"),
    "2node": Run("2node", 2, 1, "configs/ddp.yaml", "torchrun-nodes",
                 "DDP, 2 nodes x 1 GPU (2 torchrun agents, c10d rendezvous)"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mom_340m.yaml", help="base config (relative to the repository)")
    p.add_argument("--runs", default="1gpu,ddp,ddp4,ddp8", help=f"comma-separated, of {list(RUNS)}")
    p.add_argument("--out", default="runs/scale", help="folder for logs, metrics and the results table")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's max_steps)")
    p.add_argument("--global_batch", type=int, default=64, help="rows per optimizer step, over all GPUs")
    p.add_argument("--warmup_steps", type=int, default=20, help="steps left out of the tokens/s")
    p.add_argument("--tail", type=int, default=50, help="last steps averaged into the final train loss")
    p.add_argument("--compare_step", type=int, default=None,
                   help="optimizer step whose global-batch loss is compared between runs (default: the last)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for all runs together; a run that would start later is skipped")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), fp32: a plumbing check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra command-line override for every run, e.g. model.config.num_layers=2")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def load_base(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())


def setting(args: argparse.Namespace, base: dict[str, Any], key: str) -> Any:
    """``data.init_args.<key>`` as the runs see it: a ``--set`` override, else the base config's value."""
    prefix = f"data.init_args.{key}="
    given = [kv[len(prefix):] for kv in args.set if kv.startswith(prefix)]
    return yaml.safe_load(given[-1]) if given else base["data"]["init_args"][key]


def run_commands(run: Run, args: argparse.Namespace, base: dict[str, Any], out: Path, port: int,
                 ) -> list[tuple[list[str], dict[str, str]]]:
    """The command(s) and extra environment of one run (two for two torchrun agents)."""
    micro = int(setting(args, base, "batch_size"))
    steps = args.steps if args.steps is not None else int(base["trainer"]["max_steps"])
    if args.global_batch % (micro * run.world_size):
        raise ValueError(f"--global_batch {args.global_batch} is not a multiple of batch_size {micro} x "
                         f"{run.world_size} GPUs ({run.name})")
    accumulate = args.global_batch // (micro * run.world_size)
    fit = ["-m", "mom_lit", "fit", "--config", str(REPO / args.config)]
    if run.overlay:
        fit += ["--config", str(REPO / run.overlay)]
    fit += [
        f"--trainer.num_nodes={run.num_nodes}", f"--trainer.devices={run.devices}",
        f"--trainer.accumulate_grad_batches={accumulate}", f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps * accumulate}", f"--data.init_args.batch_size={micro}",
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={run.name}",
        "--trainer.logger.init_args.version=0",
        "--trainer.callbacks+=scale_runs.ScaleProbe", f"--trainer.callbacks.out_dir={out / run.name}",
        f"--trainer.callbacks.warmup_steps={args.warmup_steps}",
    ]
    if run.world_size == 1 and run.overlay is None:
        # One device without a DDP wrapper (the paper configs name ddp): the baseline pays no reducer hooks.
        fit += ["--trainer.strategy=auto"]
    if run.overlay == "configs/fsdp2.yaml":  # the data-parallel mesh spans every rank
        fit += [f"--trainer.strategy.init_args.data_parallel_size={run.world_size}"]
    if args.cpu:
        fit += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    fit += [f"--{kv}" for kv in args.set]
    py = [sys.executable]
    gpus = visible_gpus()
    if args.dry_run and len(gpus) < run.devices * run.num_nodes:  # printing the commands needs no GPU
        gpus = [str(i) for i in range(run.devices * run.num_nodes)]
    if not args.cpu and len(gpus) < run.devices * run.num_nodes:
        raise SystemExit(f"{run.name} needs {run.devices * run.num_nodes} GPUs; CUDA_VISIBLE_DEVICES leaves "
                         f"{len(gpus)}")
    if run.launcher == "lightning":
        env = {} if args.cpu else {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:run.devices])}
        return [(py + fit, env)]
    if run.launcher == "torchrun":
        env = {} if args.cpu else {"CUDA_VISIBLE_DEVICES": ",".join(gpus[:run.devices])}
        return [(py + ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.devices}"] + fit,
                 env)]
    # One agent per "node", each with its own GPU, meeting at a c10d rendezvous on this host.
    agents = []
    for node in range(run.num_nodes):
        env = {} if args.cpu else {"CUDA_VISIBLE_DEVICES": gpus[node]}
        agents.append((py + ["-m", "torch.distributed.run", f"--nnodes={run.num_nodes}",
                             f"--nproc-per-node={run.devices}", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=scale-{run.name}"] + fit, env))
    return agents


def visible_gpus() -> list[str]:
    """The GPUs this script may use, in order: those of ``CUDA_VISIBLE_DEVICES`` if it is set (so that two
    1-GPU runs can be pinned to different cards), else every device of the host."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def child_env() -> dict[str, str]:
    """The environment of the runs: this folder on the path, for :class:`ScaleProbe`."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tools"),
                                                                      os.environ.get("PYTHONPATH")]))}


def check_installed() -> None:
    """The runs import ``mom_lit`` as installed: ``callbacks/`` becomes ``mom_lit.callbacks`` only then."""
    probe = "import importlib.util as u; raise SystemExit(u.find_spec('mom_lit.callbacks') is None)"
    if subprocess.run([sys.executable, "-c", probe], cwd="/", env=child_env()).returncode:
        raise SystemExit("mom_lit.callbacks is not importable: install the package first (pip install -e .)")


def execute(run: Run, commands: list[tuple[list[str], dict[str, str]]], out: Path, timeout: float) -> dict:
    """Runs the command(s) of one run together; returns the exit codes and wall time."""
    env_base = child_env()
    log = (out / f"{run.name}.log").open("w")
    start = time.perf_counter()
    procs = []
    for i, (cmd, env) in enumerate(commands):
        log.write(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}\n")
        log.flush()
        # Each command in a session of its own, so that a timeout ends its whole process group.
        procs.append(subprocess.Popen(cmd, cwd=out, env={**env_base, **env}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start))))
        except subprocess.TimeoutExpired:
            codes.append("timeout")
    for proc, code in zip(procs, codes):
        if code == "timeout" or proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
    log.close()
    return {"exit_codes": codes, "wall_s": time.perf_counter() - start}


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summarise(name: str, run: Run, outcome: dict, out: Path, tail: int, global_batch: int, seq_len: int,
              compare_step: int | None) -> dict:
    row: dict[str, Any] = {"run": name, "description": run.description, "gpus": run.world_size, **outcome}
    probe_path = out / name / PROBE_FILE
    if not probe_path.is_file():
        row["ok"] = False
        return row
    probe = json.loads(probe_path.read_text())
    losses = probe["step_losses"]
    last = losses[-tail:]
    mean = sum(last) / len(last)
    sd = math.sqrt(sum((x - mean) ** 2 for x in last) / max(len(last) - 1, 1))
    per_rank = probe["tokens_per_sec_per_rank"]
    step = compare_step if compare_step is not None else len(losses)
    step_s = finite_mean(probe.get("step_seconds_per_rank", []))
    data_s = finite_mean(probe.get("data_wait_seconds_per_step_per_rank", []))
    comm_s = finite_mean(probe.get("exposed_communication_seconds_per_step_per_rank", []))
    row.update(
        compare_step=step, compare_loss=losses[step - 1] if 0 < step <= len(losses) else None,
        step_ms=1e3 * step_s, data_ms=1e3 * data_s, comm_ms=1e3 * comm_s,
        compute_ms=1e3 * (step_s - data_s - (0.0 if math.isnan(comm_s) else comm_s)),
    )
    row.update(
        ok=all(c == 0 for c in outcome["exit_codes"]), probe=probe, steps=probe["steps"],
        accumulate=probe["accumulate_grad_batches"], tokens_per_step=global_batch * seq_len,
        train_loss=mean, train_loss_se=sd / math.sqrt(len(last)), val_loss=probe["val_loss"],
        tokens_per_sec_per_gpu=sum(per_rank) / len(per_rank), tokens_per_sec_total=sum(per_rank),
        peak_gib=max(probe["peak_allocated_gib_per_rank"]),
    )
    return row


def fmt(x: Any, spec: str) -> str:
    """``x`` in ``spec`` (a format spec, then optionally a space and a unit); ``-`` for a missing value."""
    spec, _, unit = spec.partition(" ")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) + (f" {unit}" if unit else "")


def write_results(rows: list[dict], out: Path, header: str) -> str:
    base = next((r for r in rows if r.get("train_loss") is not None), None)
    lines = [header, "",
             "| run | launch | GPUs | accumulate | steps | train loss (last steps) | val loss | d train | d val "
             "| loss at step | d loss at step | tokens/s per GPU | of first run | tokens/s total | step | data "
             "| comm. not overlapped | compute | peak memory | wall |",
             "|" + "---|" * 20]
    for r in rows:
        if r.get("train_loss") is None:
            lines.append(f"| {r['run']} | {r['description']} | {r['gpus']} | - | - | FAILED (exit {r['exit_codes']}) "
                         + "| - " * 13 + f"| {r['wall_s']:.0f} s |")
            continue
        d_train = r["train_loss"] - base["train_loss"] if r is not base else None
        d_val = (r["val_loss"] - base["val_loss"]) if r is not base and None not in (r["val_loss"],
                                                                                    base["val_loss"]) else None
        same_step = r is not base and r["compare_step"] == base["compare_step"] and None not in (
            r["compare_loss"], base["compare_loss"])
        d_step = r["compare_loss"] - base["compare_loss"] if same_step else None
        ratio = r["tokens_per_sec_per_gpu"] / base["tokens_per_sec_per_gpu"] if r is not base else None
        lines.append(
            f"| {r['run']} | {r['description']} | {r['gpus']} | {r['accumulate']} | {r['steps']} "
            f"| {r['train_loss']:.4f} +- {r['train_loss_se']:.4f} | {fmt(r['val_loss'], '.4f')} "
            f"| {fmt(d_train, '+.4f')} | {fmt(d_val, '+.4f')} | {fmt(r['compare_loss'], '.4f')} (step "
            f"{r['compare_step']}) | {fmt(d_step, '+.5f')} | {fmt(r['tokens_per_sec_per_gpu'], ',.0f')} "
            f"| {fmt(ratio, '.1%')} | {fmt(r['tokens_per_sec_total'], ',.0f')} | {fmt(r['step_ms'], '.1f ms')} "
            f"| {fmt(r['data_ms'], '.1f ms')} | {fmt(r['comm_ms'], '.1f ms')} | {fmt(r['compute_ms'], '.1f ms')} "
            f"| {r['peak_gib']:.2f} GiB | {r['wall_s']:.0f} s |" + ("" if r["ok"] else " (non-zero exit)"))
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    done = [r for r in rows if r.get("probe")]
    if done:
        with (out / "step_losses.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step"] + [r["run"] for r in done])
            for step in range(max(len(r["probe"]["step_losses"]) for r in done)):
                writer.writerow([step + 1] + [
                    f"{r['probe']['step_losses'][step]:.5f}" if step < len(r["probe"]["step_losses"]) else ""
                    for r in done])
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {list(RUNS)}")
    base = load_base(REPO / args.config)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plans = {name: run_commands(RUNS[name], args, base, out, free_port()) for name in names}
    if args.dry_run:
        for name, commands in plans.items():
            for cmd, env in commands:
                print(f"[{name}] {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}")
        return 0

    check_installed()
    if base["data"]["init_args"].get("data_dir") is None:
        # Prepare the embedded corpus once, before any run, so that no run's wall time includes it.
        sys.path.insert(0, str(REPO))
        from mom_lit.data.shakespeare import ensure_shakespeare

        ensure_shakespeare(base["data"]["init_args"].get("tokenizer", "byte"))
    seq_len = int(setting(args, base, "seq_len"))
    device = "CPU" if args.cpu else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    header = (f"config {args.config}{' + ' + ' '.join(args.set) if args.set else ''}; global batch "
              f"{args.global_batch} x {seq_len} tokens; {device}; torch {torch.__version__}, lightning "
              f"{L.__version__}; train loss = mean over the last {args.tail} steps of the global-batch loss "
              f"(+- its standard error); tokens/s after {args.warmup_steps} warm-up steps")
    rows = []
    start = time.perf_counter()
    for name, commands in plans.items():
        left = args.timeout if args.deadline is None else min(args.timeout, args.deadline - (time.perf_counter() - start))
        if left < 10:
            print(f"[{name}] skipped: the deadline has passed", flush=True)
            rows.append({"run": name, "description": RUNS[name].description, "gpus": RUNS[name].world_size,
                         "exit_codes": ["skipped"], "wall_s": 0.0})
            continue
        print(f"[{name}] {RUNS[name].description} ...", flush=True)
        outcome = execute(RUNS[name], commands, out, left)
        row = summarise(name, RUNS[name], outcome, out, args.tail, args.global_batch, seq_len, args.compare_step)
        rows.append(row)
        print(f"[{name}] exit {outcome['exit_codes']} in {outcome['wall_s']:.0f} s; train loss "
              f"{fmt(row.get('train_loss'), '.4f')}, val loss {fmt(row.get('val_loss'), '.4f')}, tokens/s per GPU "
              f"{fmt(row.get('tokens_per_sec_per_gpu'), ',.0f')}, peak {fmt(row.get('peak_gib'), '.2f')} GiB",
              flush=True)
        if row.get("train_loss") is None:
            print((out / f"{name}.log").read_text()[-3000:], flush=True)
        # Rewritten after every run: a run killed from outside (a job's time limit) keeps the finished ones.
        write_results(rows, out, header)
    table = write_results(rows, out, header)
    print("\n" + table, flush=True)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Language-model loss of MoM against the single-memory Gated DeltaNet at a matched number of training tokens.

One run trains one variant through the product's own command line and evaluates it::

    python tools/lm_compare.py run --variant mom --data data/pylib --tokens 60e6 --seed 0 --out runs/lm/mom_s0
    python tools/lm_compare.py run --variant gdn --data data/pylib --tokens 60e6 --seed 0 --out runs/lm/gdn_s0

``run`` resolves the config stack (``configs/code_100m.yaml``, plus ``configs/code_100m_gdn.yaml`` for ``gdn``,
plus any overrides after ``--``) with the CLI's own parser, derives ``trainer.max_steps`` from ``--tokens`` and
the tokens per optimizer step (rounded up to a whole number of validation intervals, so the run ends with a
validation and its checkpoint), prints them, and runs ``python -m mom_lit fit`` with its output teed to
``OUT/fit.log``. Both variants read the same data in the same order (``--seed`` seeds the model and the data
order). Then ``mom-lit evaluate length`` scores the final checkpoint against position up to ``--length-factor`` x
the training context on held-out documents of the data's ``val`` split (``OUT/length.json``), and ``summarize``
writes ``OUT/summary.json``.

``summarize OUT [--json PATH]`` (re)writes the one small JSON of a run from its TensorBoard event files,
``OUT/run.json`` and ``OUT/length.json``: validation loss against tokens seen, the training loss curve
(subsampled), parameters in total and active per token, tokens/s over the run after its first steps, peak GPU
memory, the most imbalanced layer's load ratio, the git commit, the card and the command.
``tools/plot_lm_compare.py`` draws the summaries.

Arguments after ``--`` go to ``python -m mom_lit fit`` unchanged (e.g. ``--model.config.aux_loss_type=global``
for a pooled balance loss; give such a run its own ``--label``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
VARIANTS = ("mom", "gdn")
LOG_NAME, LOG_VERSION = "logs", "train"  # the run's logger folder: OUT/logs/train
TRAIN_POINTS = 200  # training-loss points kept in a summary


# Resolving the run ----------------------------------------------------------------------------------------------
def parse_fit_config(args: Sequence[str]) -> Any:
    """The config ``python -m mom_lit fit ARGS`` would run, parsed and validated by the CLI without building
    anything (no model, no data read)."""
    import warnings

    from mom_lit.training.cli import MoMLightningCLI

    class ParseOnly(MoMLightningCLI):
        def instantiate_classes(self) -> None:
            pass

    with warnings.catch_warnings():
        # LightningCLI warns that this process's own command line is not the one it parses: that is the point.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ParseOnly(args=list(args), run=False).config


def tokens_per_step(cfg: Any) -> int:
    """Training tokens per optimizer step of a parsed config (rows x context x accumulation x processes)."""
    t, d = cfg.trainer, cfg.data.init_args
    processes = 1
    for name in ("devices", "num_nodes"):
        value = getattr(t, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SystemExit(f"trainer.{name} must be a positive integer to count tokens per step, got {value!r}")
        processes *= value
    return d.batch_size * d.seq_len * t.accumulate_grad_batches * processes


def plan_steps(tokens: float, cfg: Any) -> tuple[int, int]:
    """(max_steps, steps between validations): ``tokens`` rounded up to whole validation intervals."""
    t = cfg.trainer
    interval = t.val_check_interval
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise SystemExit(f"trainer.val_check_interval must be a whole number of batches, got {interval!r}")
    if interval % t.accumulate_grad_batches:
        raise SystemExit(f"trainer.val_check_interval={interval} batches is not a whole number of optimizer steps "
                         f"(accumulate_grad_batches={t.accumulate_grad_batches})")
    val_steps = interval // t.accumulate_grad_batches
    steps = math.ceil(tokens / tokens_per_step(cfg) / val_steps) * val_steps
    return max(steps, val_steps), val_steps


def data_tokenizer(data_dir: Path) -> str:
    """The tokenizer a prepared folder was made with: its ``tokenizer.json``, else the name its metadata records."""
    from mom_lit.data.prepare import read_meta

    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise SystemExit(f"--data {data_dir} has no {split}/ split: prepare it with mom-lit prepare")
    if (data_dir / "tokenizer.json").is_file():
        return str(data_dir / "tokenizer.json")
    return read_meta(data_dir / "train")["tokenizer"]


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": dirty}


def card_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _tee(command: list[str], log: Path) -> int:
    """Runs ``command`` in the repository root, its output to this process's stdout and to ``log``."""
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        while chunk := process.stdout.read1(1 << 16):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            sink.write(chunk)
        return process.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data).expanduser().resolve()
    out = Path(args.out).expanduser().resolve()
    if (out / "run.json").exists():
        raise SystemExit(f"--out {out} already holds a run (run.json): choose another folder or remove it")
    if args.tokens <= 0:
        raise SystemExit(f"--tokens must be positive, got {args.tokens}")
    tokenizer = data_tokenizer(data)
    configs = [args.config] + ([args.gdn_config] if args.variant == "gdn" else [])
    fit_args = [a for c in configs for a in ("--config", str((REPO / c) if not Path(c).is_absolute() else c))]
    fit_args += [f"--seed_everything={args.seed}", f"--data.init_args.data_dir={data}",
                 f"--data.init_args.tokenizer={tokenizer}", f"--data.init_args.seed={args.seed}",
                 f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={LOG_NAME}",
                 f"--trainer.logger.init_args.version={LOG_VERSION}"]
    cfg = parse_fit_config(fit_args + list(args.fit_args))  # fails here, before anything is written
    steps, val_steps = plan_steps(args.tokens, cfg)
    per_step = tokens_per_step(cfg)
    fit_args += [f"--trainer.max_steps={steps}"] + list(args.fit_args)
    command = [sys.executable, "-m", "mom_lit", "fit", *fit_args]
    seq_len = cfg.data.init_args.seq_len
    print(f"[lm_compare] {args.label}: {steps} steps x {per_step:,} tokens = {steps * per_step / 1e6:.1f}M tokens "
          f"(asked {args.tokens / 1e6:.1f}M), validation every {val_steps} steps; context {seq_len}", flush=True)
    print("[lm_compare] " + shlex.join(command), flush=True)
    if args.dry_run:
        return {"steps": steps, "tokens_per_step": per_step, "command": command}

    out.mkdir(parents=True, exist_ok=True)
    record = {"label": args.label, "variant": args.variant, "seed": args.seed, "data": str(data),
              "tokenizer": tokenizer, "tokens_requested": args.tokens, "steps": steps, "tokens_per_step": per_step,
              "val_every_steps": val_steps, "seq_len": seq_len, "command": shlex.join(command),
              "git": git_commit(), "device": card_name(), "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    start = time.perf_counter()
    code = _tee(command, out / "fit.log")
    record["fit_seconds"] = time.perf_counter() - start
    record["fit_exit_code"] = code
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    if code != 0:
        raise SystemExit(f"[lm_compare] training exited with code {code}; its output is in {out / 'fit.log'}")

    if args.length_factor > 0:
        evaluate_length(out, data, tokenizer, seq_len, args)
    summary = summarize(out)
    print(f"[lm_compare] wrote {out / 'summary.json'}: final val loss {summary['final_val_loss']}, "
          f"{summary['tokens_per_sec']} tokens/s, peak {summary['peak_memory_gib']} GiB", flush=True)
    return summary


def final_checkpoint(out: Path) -> Path:
    found = sorted((out / LOG_NAME / LOG_VERSION).glob("checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no last.ckpt under {out / LOG_NAME / LOG_VERSION / 'checkpoints'}: the run saved none")
    return found[-1]


def evaluate_length(out: Path, data: Path, tokenizer: str, seq_len: int, args: argparse.Namespace) -> None:
    """``mom-lit evaluate length`` on the final checkpoint, on the held-out documents longer than the training
    context."""
    import torch

    from mom_lit.eval.length_cli import main as length_main

    device = "cuda" if torch.cuda.is_available() else "cpu"
    length_args = ["--checkpoint", str(final_checkpoint(out)), "--tokenizer", tokenizer, "--split", str(data / "val"),
                   "--max-length", str(args.length_factor * seq_len), "--min-length", str(seq_len),
                   "--chunk-size", str(seq_len), "--batch-size", str(args.length_batch), "--max-docs",
                   str(args.length_docs), "--train-length", str(seq_len), "--device", device, "--out",
                   str(out / "length"), "--title", f"{args.label}: loss against position"]
    print("[lm_compare] mom-lit evaluate length " + shlex.join(length_args), flush=True)
    start = time.perf_counter()
    length_main(length_args)
    print(f"[lm_compare] length evaluation took {time.perf_counter() - start:.0f} s", flush=True)


# Summary --------------------------------------------------------------------------------------------------------
def _subsample(points: list[list[float]], keep: int) -> list[list[float]]:
    if len(points) <= keep:
        return points
    stride = len(points) / keep
    picked = [points[int(i * stride)] for i in range(keep)]
    return picked[:-1] + [points[-1]] if picked[-1] is not points[-1] else picked


def summarize(out: str | Path, json_path: str | Path | None = None, skip_steps: int | None = None) -> dict[str, Any]:
    """Writes and returns the summary of the run in ``out`` (``out/summary.json`` unless ``json_path``)."""
    import torch
    import yaml

    sys.path.insert(0, str(TOOLS))
    from plot_training import read_scalars

    from mom_lit import MoMConfig, MoMForCausalLM
    from mom_lit.training.flops import active_parameters

    out = Path(out)
    if not (out / "run.json").is_file():
        raise SystemExit(f"{out} holds no run.json: not a folder written by 'lm_compare.py run'")
    record = json.loads((out / "run.json").read_text())
    log_dir = out / LOG_NAME / LOG_VERSION
    scalars = read_scalars(log_dir)
    per_step = record["tokens_per_step"]
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    config = MoMConfig.from_dict(hparams["config"])
    with torch.device("meta"):
        total = MoMForCausalLM(config).num_parameters()

    # Lightning logs a value at the index of the optimizer step it followed (0 for the first): training and
    # validation values of one step share its tokens seen.
    tokens_seen = dict(scalars.get("train/tokens_seen", []))

    def seen(step: int) -> int:
        return int(tokens_seen.get(step, (step + 1) * per_step))

    # The last optimizer step anything was logged at: the closing validation when the run ended as planned
    # (training values are logged only every log_every_n_steps).
    last_step = max((step for series in scalars.values() for step, _ in series), default=-1)
    tokens = seen(last_step) if last_step >= 0 else 0
    train = [[seen(step), value] for step, value in scalars.get("train/lm_loss", [])]
    val = [[seen(step), value] for step, value in scalars.get("val/loss", [])]
    skip = skip_steps if skip_steps is not None else min(50, record["steps"] // 10)
    rates = sorted(v for step, v in scalars.get("throughput/tokens_per_sec", []) if step >= skip)
    peak = [v for _, v in scalars.get("memory/peak_allocated_gib", [])]
    worst = scalars.get("routing/max_min_ratio_worst", [])
    layers = sorted({int(tag.split("/")[1].removeprefix("layer")) for tag in scalars
                     if tag.startswith("routing/layer") and tag.endswith("/max_min_ratio")})
    aux = scalars.get("train/aux_loss", [])
    summary = {
        "label": record["label"], "variant": record["variant"], "seed": record["seed"],
        "config": {k: v for k, v in config.to_dict().items()},
        "parameters": {"total": total, "active_per_token": active_parameters(config, total),
                       "embedding": config.vocab_size * config.hidden_size},
        # What the run did, which is less than planned when it was stopped early (e.g. trainer.max_time).
        "seq_len": record["seq_len"], "tokens_per_step": per_step, "steps_planned": record["steps"],
        "steps": last_step + 1,
        "tokens": tokens,
        "val_loss": val, "final_val_loss": val[-1][1] if val else None,
        "train_loss": _subsample(train, TRAIN_POINTS),
        "tokens_per_sec": rates[len(rates) // 2] if rates else None,
        "tokens_per_sec_note": f"median of the logged 20-batch windows from step {skip} on (validation excluded)",
        "fit_seconds": record.get("fit_seconds"),
        # Over the whole command: start-up, compilation, validation and checkpoints included.
        "tokens_per_sec_wall": tokens / record["fit_seconds"] if tokens and record.get("fit_seconds") else None,
        "peak_memory_gib": max(peak) if peak else None,
        "final_aux_loss": aux[-1][1] if aux else None,
        "routing": {"max_min_ratio_worst": worst[-1][1] if worst else None,
                    "max_min_ratio_per_layer": [scalars[f"routing/layer{i}/max_min_ratio"][-1][1] for i in layers]},
        "device": record["device"], "git": record["git"], "command": record["command"],
        "data": record["data"], "tokenizer": record["tokenizer"],
    }
    if (out / "length.json").is_file():
        length = json.loads((out / "length.json").read_text())
        summary["length"] = {"meta": length["meta"], "buckets": length["buckets"]}
    target = Path(json_path) if json_path is not None else out / "summary.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/lm_compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one variant, evaluate it against position, summarise it")
    r.add_argument("--variant", choices=VARIANTS, required=True, help="mom (the config) or gdn (plus its overlay)")
    r.add_argument("--data", required=True, help="folder prepared by mom-lit prepare (train/, val/)")
    r.add_argument("--tokens", type=float, required=True, help="training tokens (e.g. 60e6)")
    r.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and of the data order")
    r.add_argument("--out", required=True, help="the run's folder (must not hold a run yet)")
    r.add_argument("--label", default=None, help="name of the run in summaries and plots (default: the variant)")
    r.add_argument("--config", default="configs/code_100m.yaml", help="base config")
    r.add_argument("--gdn-config", default="configs/code_100m_gdn.yaml", help="overlay of the gdn variant")
    r.add_argument("--length-factor", type=int, default=8,
                   help="evaluate the loss against position up to this many training contexts (0: skip)")
    r.add_argument("--length-docs", type=int, default=64, help="held-out documents of the length evaluation")
    r.add_argument("--length-batch", type=int, default=8, help="documents per batch of the length evaluation")
    r.add_argument("--dry-run", action="store_true", help="print the plan and the command, run nothing")
    s = sub.add_parser("summarize", help="(re)write a run's summary JSON")
    s.add_argument("out", help="the run's folder")
    s.add_argument("--json", default=None, help="where to write it (default OUT/summary.json)")
    s.add_argument("--skip-steps", type=int, default=None,
                   help="steps left out of tokens/s (default: min(50, a tenth of the run))")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if args.command == "summarize":
        return summarize(args.out, args.json, args.skip_steps)
    args.fit_args = fit_args
    args.label = args.label or args.variant
    return run(args)


if __name__ == "__main__":
    main()

"""The ``mom-lit`` command, also ``python -m mom_lit``: one verb per job.

::

    mom-lit prepare my_corpus/ --output_dir data/my_corpus
    mom-lit fit --config quickstart --data.init_args.data_dir=data/my_corpus
    mom-lit generate --checkpoint runs/quickstart/version_0/checkpoints/last.ckpt --prompt "ROMEO:"
    mom-lit convert runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart
    mom-lit evaluate --model mom_lit --model_args checkpoint=exported/quickstart --tasks lambada_openai
    mom-lit evaluate length --checkpoint exported/quickstart --max-length 32768 --train-length 256

``fit``, ``validate`` and ``test`` are LightningCLI's (``--config`` takes a path or a shipped config's name);
the others are small argparse programs. Each verb's module is imported only when the verb runs.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

PROG = "mom-lit"


class Verb(NamedTuple):
    module: str | None  # its `main(argv, prog)` runs the verb; None: a LightningCLI subcommand
    help: str


VERBS: dict[str, Verb] = {
    "fit": Verb(None, "train a model (LightningCLI); --ckpt_path last resumes the newest run"),
    "validate": Verb(None, "the validation loss of a checkpoint (--ckpt_path) on the val split"),
    "test": Verb(None, "the loss of a checkpoint (--ckpt_path) on the test split"),
    "prepare": Verb("mom_lit.data.prepare_cli", "tokenise .txt/.jsonl/.parquet files into the chunks fit reads"),
    "generate": Verb("mom_lit.generate", "sample text from a checkpoint, streamed to the terminal"),
    "convert": Verb("mom_lit.interop.convert_cli", "convert between a Lightning .ckpt, a mom_lit and an fla directory"),
    "evaluate": Verb("mom_lit.eval.__main__", "lm-evaluation-harness tasks (needs mom_lit[eval]); `evaluate length`: "
                     "loss against position in the context"),
}
# LightningCLI's predict has nothing to predict for a language model: sampling is `generate`.
NOT_OFFERED = {"predict": "use `mom-lit generate` to sample text, `mom-lit validate`/`test` for losses"}


def usage() -> str:
    from mom_lit.shipped_configs import shipped_config_names

    width = max(map(len, VERBS))
    lines = [f"usage: {PROG} VERB [options]   (the same: python -m mom_lit VERB [options])", "",
             "Mixture-of-Memories language models: prepare data, train, sample, convert, evaluate.", "", "verbs:"]
    lines += [f"  {name:<{width}}  {verb.help}" for name, verb in VERBS.items()]
    names = f"shipped configs (--config NAME, or a path): {', '.join(shipped_config_names())}"
    lines += ["", *textwrap.wrap(names, width=100, subsequent_indent="  "),
              f"`{PROG} VERB --help` lists the options of a verb; `{PROG} --version` names the installed copy."]
    return "\n".join(lines)


def _fail(message: str, prog: str = PROG) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _run_lightning(verb: str, argv: list[str], from_command_line: bool) -> None:
    from mom_lit.shipped_configs import UnknownConfigError, resolve_config_args

    try:
        args = [verb, *resolve_config_args(argv)]
    except UnknownConfigError as err:
        _fail(str(err), f"{PROG} {verb}")
    from mom_lit.training.cli import cli_main
    from mom_lit.training.faults import preemption_exit_code

    if from_command_line:  # LightningCLI warns when given args while sys.argv holds some too
        sys.argv[1:] = args
        cli = cli_main()
    else:
        cli = cli_main(args)
    trainer = getattr(cli, "trainer", None)
    # A run stopped by SIGTERM/SIGUSR1 exits with its PreemptionCheckpoint's exit_code (0 unless configured).
    code = preemption_exit_code(trainer) if trainer is not None else 0
    if code:
        sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``mom-lit`` on ``argv`` (default: ``sys.argv[1:]``); exits with the verb's status when it fails."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        import mom_lit

        print(f"mom_lit {mom_lit.__version__} from {Path(mom_lit.__file__).parent}")
        return
    name, rest = argv[0], argv[1:]
    if name in NOT_OFFERED:
        _fail(f"{name} is not offered: {NOT_OFFERED[name]}")
    if name not in VERBS:
        close = difflib.get_close_matches(name, VERBS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _fail(f"{name!r} is not a verb{hint}; the verbs: {', '.join(VERBS)} (`{PROG} --help` describes them)")
    module = VERBS[name].module
    if module is None:
        _run_lightning(name, rest, from_command_line)
        return
    code = importlib.import_module(module).main(rest, prog=f"{PROG} {name}")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()

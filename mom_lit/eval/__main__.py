"""``mom-lit evaluate --model mom_lit --model_args checkpoint=... --tasks ...``: lm_eval's command line with the
``mom_lit`` model registered (lm_eval finds models only among those imported before it parses). Also reachable
as ``python -m mom_lit.eval``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "mom-lit evaluate"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """Run lm_eval's command line on ``argv`` (default: ``sys.argv[1:]``)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit(f"{prog} needs lm-evaluation-harness: pip install 'mom_lit[eval]' ({error})") from None
    import mom_lit.eval.lm_eval_adapter  # noqa: F401  (registers the model name)

    # lm_eval's parser reads sys.argv (it inserts its default "run" command there).
    sys.argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main(prog="python -m mom_lit.eval")

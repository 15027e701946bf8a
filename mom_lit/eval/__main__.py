"""``mom-lit evaluate``, also ``python -m mom_lit.eval``: two evaluations of a checkpoint.

* ``mom-lit evaluate --model mom_lit --model_args checkpoint=... --tasks ...`` is lm_eval's command line with the
  ``mom_lit`` model registered (lm_eval finds models only among those imported before it parses; needs
  ``pip install 'mom_lit[eval]'``).
* ``mom-lit evaluate length --checkpoint ...`` is the loss against position in the context
  (:mod:`mom_lit.eval.length_cli`; no extra dependency but matplotlib for its plot).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "mom-lit evaluate"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """Run ``mom-lit evaluate`` on ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["length"]:
        from mom_lit.eval.length_cli import main as length_main

        length_main(argv[1:], prog=f"{prog} length")
        return
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit(f"{prog} needs lm-evaluation-harness: pip install 'mom_lit[eval]' ({error}); "
                         f"`{prog} length` needs no extra package") from None
    import mom_lit.eval.lm_eval_adapter  # noqa: F401  (registers the model name)

    # lm_eval's parser reads sys.argv (it inserts its default "run" command there).
    sys.argv = [prog, *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(prog="python -m mom_lit.eval")

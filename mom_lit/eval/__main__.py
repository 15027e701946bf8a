"""``python -m mom_lit.eval --model mom_lit --model_args checkpoint=... --tasks ...``: lm_eval's command line
with the ``mom_lit`` model registered (lm_eval finds models only among those imported before it parses)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit(f"python -m mom_lit.eval needs lm-evaluation-harness: pip install 'mom_lit[eval]' ({error})")
    import mom_lit.eval.lm_eval_adapter  # noqa: F401  (registers the model name)

    if argv is not None:
        # lm_eval's parser reads sys.argv (it inserts the default "run" command there).
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

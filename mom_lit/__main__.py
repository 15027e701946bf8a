"""``python -m mom_lit fit --config configs/quickstart.yaml`` (also installed as the ``mom-lit`` command)."""

from __future__ import annotations

import sys

from mom_lit.training.cli import cli_main
from mom_lit.training.faults import preemption_exit_code


def main() -> None:
    cli = cli_main()
    trainer = getattr(cli, "trainer", None)
    # A run stopped by SIGTERM/SIGUSR1 exits with its PreemptionCheckpoint's exit_code (0 unless configured).
    code = preemption_exit_code(trainer) if trainer is not None else 0
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()

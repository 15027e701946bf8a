"""``python -m mom_lit fit --config configs/quickstart.yaml`` (also installed as the ``mom-lit`` command)."""

from __future__ import annotations

from mom_lit.training.cli import cli_main


def main() -> None:
    cli_main()


if __name__ == "__main__":
    main()

"""The ``ctpa-vq`` command: prepare / reconstruct / evaluate / push / verify / latent-stats.

Each sub-command is a thin shell over a library function; errors the user can fix are
printed as one line naming the file and the problem, with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctpa-vq", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Each sub-command is one `_add_<name>(subparsers)` function below, called here.
    # [cli: prepare]
    # [cli: reconstruct]
    # [cli: push]
    # [cli: latent-stats]
    # [cli: verify]
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"ctpa-vq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""python -m bridgejax.prepare SOURCE --out DIR ...: prepare a dataset once (bridgejax.data.prepare has the
sources, their flags and the shard format), plus the toy world's `toy` subcommand (bridgejax.toy.prepare).

The command line stands above both: the data library never imports the toy world, which builds on it.
"""

from __future__ import annotations

import sys

from bridgejax.data import prepare
from bridgejax.toy.prepare import COMMAND as TOY

COMMANDS = {**prepare.COMMANDS, "toy": TOY}


def main(argv: list[str] | None = None) -> int:
  return prepare.main(argv, commands=COMMANDS)


if __name__ == "__main__":
  sys.exit(main())

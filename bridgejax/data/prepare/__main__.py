"""python -m bridgejax.data.prepare: the data sources' CLI, plus the toy world's `toy` subcommand.

This entry point is the CLI layer: it may import bridgejax.toy (which builds on bridgejax.data);
nothing imports it, so the data library stays free of the toy world.
"""

import sys

from bridgejax.data.prepare import COMMANDS, main
from bridgejax.toy.prepare import COMMAND as TOY

if __name__ == "__main__":
  sys.exit(main(commands={**COMMANDS, "toy": TOY}))

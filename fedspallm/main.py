"""Entry point for ``fabric run --devices N fedspallm/main.py [--config ...] [--key value ...]``.

Without a subcommand it runs ``prune``; ``python fedspallm/main.py validate ...`` works too. Under
``fabric run`` the launcher has already created the processes, so Fabric is not launched again.
"""

import os
import sys

# Run as a script, this file's folder would shadow top-level modules with ours (data, config, ...).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from fedspallm.cli import main as cli_main  # noqa: E402

SUBCOMMANDS = {"prune", "validate", "test", "fit", "plot"}


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["prune", *argv]
    cli_main(argv)


if __name__ == "__main__":
    main()

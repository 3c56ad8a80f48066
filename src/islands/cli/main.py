"""islands: train one network on many poorly connected machines (simulated or for real).

    islands sim [CONFIG] [--set k=v ...] [--out DIR]   simulate (no CONFIG: the main job)
    islands compare RUN_DIR ... [--out PNG]            side-by-side table and combined plot
    islands coordinator --port P [--token-file F]      membership service of the real runtime
    islands run CONFIG --coordinator HOST:P --worker-id NAME [--token-file F]
    islands launch CONFIG --workers N [--out DIR]      coordinator and N workers on this machine
    islands status --coordinator HOST:P                members, epoch, last round
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from islands.cli import runtime_cmd, sim_cmd
from islands.core.errors import IslandsError

COMMANDS = [sim_cmd, runtime_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="islands", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except IslandsError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; finished runs are on disk")
        return 130


if __name__ == "__main__":
    sys.exit(main())

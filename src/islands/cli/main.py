"""islands: train one network on many poorly connected machines (simulated or for real).

    islands sim [CONFIG] [--set k=v ...] [--out DIR]   simulate one run (no CONFIG: defaults)
    islands demo [--set k=v ...] [--out DIR]           the main job: four runs and a table
    islands compare RUN_DIR ... [--out PNG]            side-by-side table and combined plot
    islands sweep [CONFIG] --grid k=v1,v2 --seeds N    search over --set values, over seeds
    islands coordinator --port P [--token-file F]      membership service of the real runtime
    islands run CONFIG --coordinator HOST:P --worker-id NAME [--token-file F]
    islands launch CONFIG --workers N [--out DIR]      coordinator and N workers on this machine
    islands status --coordinator HOST:P                members, epoch, last round
"""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from islands.cli import runtime_cmd, sim_cmd, sweep_cmd
from islands.core.errors import IslandsWarning

COMMANDS = [sim_cmd, sweep_cmd, runtime_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="islands", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)  # no line breaks inside a message


def show_warnings() -> None:
    """Prints islands' warnings as one line on stderr (``warning: ...``), other warnings as
    Python does."""
    default = warnings.showwarning
    if getattr(default, "islands", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, IslandsWarning):
            _stderr().print(f"[bold yellow]warning:[/] {escape(str(message))}",
                            highlight=False)
        else:
            default(message, category, filename, lineno, file, line)

    show.islands = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    show_warnings()
    return runtime_cmd.dispatch(
        build_parser().parse_args(argv),
        lambda e: _stderr().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False),
        lambda: _stderr().print("interrupted; finished runs are on disk"))


if __name__ == "__main__":
    sys.exit(main())

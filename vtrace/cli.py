"""The `vtrace` command line: thin typer commands over the library.

Each command parses, calls the library, and renders with rich or prints `--json`. A
:class:`~vtrace.errors.VtraceError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from vtrace import __version__
from vtrace.errors import VtraceError

app = typer.Typer(
    name="vtrace",
    help="What each guest I/O costs in KVM exits, and what virtio rings, batching and "
    "notification suppression buy back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"vtrace {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vtrace: capture, understand and predict the cost of guest I/O on KVM."""


# Commands are grouped by part of the product, one section each; each section only adds
# @app.command functions and imports what it needs inside them (keeps `--help` fast).

# --- import ---------------------------------------------------------------------------------


# --- summary ----------------------------------------------------------------------------------


# --- capture: record / doctor / stat -----------------------------------------------------------


# --- lab: the /dev/kvm lab VMM --------------------------------------------------------------------


# --- qemu-lab: real Linux guests under QEMU -------------------------------------------------------


# --- model: calibrate / replay / sweep ---------------------------------------------------------


# --- demo / notebook ------------------------------------------------------------------------------


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except VtraceError as e:
        err_console.print(f"vtrace: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("vtrace: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

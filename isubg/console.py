"""What the user sees: the shared rich consoles, warnings and error messages.

Tables stay readable without colour: markers are characters (`*`, `!`), never colour alone, and
rich drops colour by itself when output is not a terminal or NO_COLOR is set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.text import Text

from isubg.config import ConfigWarning

__all__ = ["err_console", "out_console", "print_error", "print_json", "print_warnings"]


def _width(stream: Any) -> int | None:
    # Piped output would otherwise be cut to 80 columns, squeezing tables into tall narrow cells.
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return 120


def out_console() -> Console:
    """A console on standard output (tables, results)."""
    return Console(width=_width(sys.stdout), highlight=False)


def err_console() -> Console:
    """A console on standard error (warnings, errors, progress)."""
    return Console(stderr=True, width=_width(sys.stderr), highlight=False)


def print_warnings(warnings: Iterable[ConfigWarning], console: Console | None = None) -> None:
    """Show config warnings on standard error; they never stop a command."""
    warnings = list(warnings)
    if not warnings:
        return
    console = console or err_console()
    console.print(Text(f"{len(warnings)} warning(s) (not fatal):", style="bold yellow"))
    for warning in warnings:
        console.print(Text("  ! ", style="yellow") + Text(str(warning)), soft_wrap=True)


def print_error(message: str) -> None:
    """Show a user error on standard error, with no traceback and no markup interpretation."""
    # soft_wrap: let the terminal wrap, so keys and paths in the message are never split by a newline.
    err_console().print(Text("Error: ", style="bold red") + Text(message), soft_wrap=True)


def print_json(data: Any) -> None:
    """Write machine-readable output to standard output, with nothing else on it."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()

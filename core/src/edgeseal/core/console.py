"""What every edgeseal command shares: output, errors, exit codes, progress. Stable API.

Exit codes (docs/cli.md): 0 ok; 1 rejected or verification failed (any
:class:`EdgesealError`); 2 usage error (bad options, missing files named on the command
line); 3 an unexpected internal error (a bug: please report it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgeseal.core.errors import EdgesealError

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "emit",
    "err_console",
    "out_console",
    "progress_bytes",
    "reports_errors",
    "untrusted",
]

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

out_console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def untrusted(value: object) -> str:
    """``value`` as text that rich prints as written: for every string that does not come
    from edgeseal itself (a device's status, a bundle's unverified fields, a model name,
    an error message quoting them). Without it ``"[/]"`` crashes the printer and other
    markup restyles or hides output."""
    return escape(str(value))


def emit(data: dict[str, Any], *, as_json: bool, render: Callable[[], None]) -> None:
    """Print ``data`` as one JSON document, or call ``render`` for people."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        render()


def reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn edgeseal errors into a clear message and exit code 1 (JSON with ``--json``)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except EdgesealError as e:
            if kwargs.get("as_json"):
                sys.stdout.write(
                    json.dumps(
                        {"ok": False, "error": type(e).__name__, "message": str(e)}, indent=2
                    )
                    + "\n"
                )
            err_console.print(
                f"[bold red]rejected[/]: {type(e).__name__}: {untrusted(e.diagnostics())}",
                highlight=False,
                markup=True,
            )
            raise typer.Exit(EXIT_REJECTED) from None
        except ValueError as e:
            err_console.print(f"[bold red]error[/]: {untrusted(e)}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


@contextlib.contextmanager
def progress_bytes(
    description: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` bytes, shown on stderr; yields an ``advance(n)``."""
    if not enabled or not err_console.is_terminal:
        yield lambda n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)

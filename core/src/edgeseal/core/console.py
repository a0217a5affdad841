"""What every edgeseal command shares: output, errors, exit codes, progress. Stable API.

Exit codes (docs/cli.md): 0 ok; 1 rejected or verification failed (any
:class:`EdgesealError` but a :class:`UsageError`); 2 usage error (bad options or values, a
:class:`UsageError`: config, a path or a name given on the command line); 3 an unexpected
internal error (a bug, and nothing else: please report it). With ``--json`` every error,
whatever its exit code, is also one JSON document on stdout (:func:`error_document`).
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

from edgeseal.core.errors import EdgesealError, UsageError

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_USAGE",
    "emit",
    "err_console",
    "error_document",
    "exit_code_for",
    "out_console",
    "progress_bytes",
    "report_error",
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


def exit_code_for(e: BaseException) -> int:
    """The exit code an exception that reached the CLI stands for (docs/cli.md)."""
    if isinstance(e, typer.TyperException):  # click's errors: bad options, a missing file
        return int(getattr(e, "exit_code", EXIT_USAGE))
    if isinstance(e, UsageError | ValueError):
        return EXIT_USAGE
    if isinstance(e, EdgesealError):
        return EXIT_REJECTED
    return EXIT_INTERNAL


def error_document(e: BaseException, exit_code: int) -> dict[str, Any]:
    """What ``--json`` prints on stdout for an error: its type, its message, the exit code
    (and the hint, where the error has one)."""
    message = str(getattr(e, "format_message", e.__str__)())
    doc: dict[str, Any] = {
        "ok": False,
        "error": type(e).__name__,
        "message": message or type(e).__name__,
        "exit_code": exit_code,
    }
    if isinstance(e, EdgesealError) and e.hint:
        doc["hint"] = e.hint
    return doc


def report_error(e: BaseException, *, as_json: bool) -> int:
    """Tell the user about ``e`` (on stderr; also as JSON on stdout with ``as_json``) and
    return the exit code for it."""
    code = exit_code_for(e)
    if as_json:
        sys.stdout.write(json.dumps(error_document(e, code), indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
    if isinstance(e, typer.TyperException):
        getattr(e, "show", lambda: err_console.print(untrusted(e)))()
    elif isinstance(e, EdgesealError):
        label = "error" if code == EXIT_USAGE else "rejected"
        err_console.print(
            f"[bold red]{label}[/]: {type(e).__name__}: {untrusted(e.diagnostics())}",
            highlight=False,
        )
    elif code == EXIT_USAGE:
        err_console.print(f"[bold red]error[/]: {untrusted(e)}", highlight=False)
    else:
        err_console.print(
            f"[bold red]internal error[/]: {untrusted(f'{type(e).__name__}: {e}')} "
            "(this is a bug in edgeseal: please report it)",
            highlight=False,
        )
    return code


def reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn errors into a clear message and the exit code docs/cli.md gives them: 1 for an
    :class:`EdgesealError`, 2 for a :class:`UsageError` or ``ValueError``, 3 for anything
    else (a bug); with ``--json`` also one JSON document on stdout."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as e:
            raise typer.Exit(report_error(e, as_json=bool(kwargs.get("as_json")))) from None

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

"""``edgeseal hw ...``: what this board is and what it can protect keys with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeseal.core.console import emit, out_console, reports_errors
from edgeseal.hardware.probe import probe

hw_app = typer.Typer(
    help="The device's hardware: board, crypto extensions, key stores.", no_args_is_help=True
)


@hw_app.command("info")
@reports_errors
def info(
    root: Annotated[
        Path, typer.Option(help="Read board files under this root (for fixture trees).")
    ] = Path("/"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Probe the board: architecture, model, L4T/JetPack, AES, TPM, TEE, PKCS#11, runtimes."""
    p = probe(root)

    def render() -> None:
        t = Table("", "", show_header=False)
        rows = [
            ("board", f"{p.board} ({p.family})"),
            ("architecture", p.architecture or "unknown"),
            ("L4T / JetPack", f"{p.l4t_release} / {p.jetpack or '?'}" if p.l4t_release else "-"),
            ("CPU crypto", ", ".join(p.crypto_extensions) or "none (use ChaCha20-Poly1305)"),
            ("TPM 2.0", p.tpm or "none"),
            ("TEE (OP-TEE)", p.tee or "none"),
            ("PKCS#11 modules", "\n".join(p.pkcs11_modules) or "none"),
            ("memory", f"{p.memory_mb} MB" if p.memory_mb else "unknown"),
            ("ONNX Runtime", ", ".join(p.onnxruntime_providers) or "not installed"),
            ("LiteRT", p.litert or "not installed"),
            (
                "lock memory",
                "yes"
                if p.can_lock_memory
                else f"limited (RLIMIT_MEMLOCK {p.memlock_limit.get('soft')})",
            ),
            ("suggested target", p.suggested_target),
        ]
        for k, v in rows:
            t.add_row(k, v)
        out_console.print(t)

    emit(p.to_obj(), as_json=as_json, render=render)


def register(app: typer.Typer) -> None:
    app.add_typer(hw_app, name="hw")

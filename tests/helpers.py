"""Helpers shared by tests: a fixed clock, running the edgeseal command, a fake PyPI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

#: "Now" for every test: the real UTC time when the test session started, to the second.
#: Certificates, bundles and offers are built relative to it, never to a calendar date,
#: so the suite passes on any day; CI runs the time-touching tests again under faketime
#: 400 days ahead (scripts/test). Stored artefacts (golden bundles, fuzz corpora) are
#: verified at the reference time they were made at instead (tests/test_no_dates.py).
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def run(*args: str, env: dict[str, str], check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseal.core", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def start_agent(home: Path, socket_path: Path, *extra: str, **popen: Any) -> subprocess.Popen[str]:
    """``edgeseal agent run`` on ``home`` and ``socket_path`` as a child process (text
    mode); ``extra`` options follow, ``popen`` goes to :class:`subprocess.Popen`."""
    command = [sys.executable, "-m", "edgeseal.core", "agent", "run", "--home", str(home)]
    command += ["--socket", str(socket_path), *extra]
    return subprocess.Popen(command, text=True, **popen)


class FakePypi(BaseHTTPRequestHandler):
    """PyPI's JSON API on loopback: ``/pypi/<name>/json`` (the latest release) and, unless
    ``release_json`` is off as on the build network, ``/pypi/<name>/<version>/json``.
    Subclasses set ``latest`` and answer :meth:`project`; ``hits`` records every path."""

    latest: ClassVar[dict[str, str]] = {}
    release_json: ClassVar[bool] = True
    missing_releases: ClassVar[frozenset[str]] = frozenset()
    hits: ClassVar[list[str]] = []

    def project(self, name: str, version: str) -> dict[str, Any]:
        raise NotImplementedError

    def do_GET(self) -> None:
        self.hits.append(self.path)
        parts = self.path.strip("/").split("/")
        known = len(parts) in (3, 4) and parts[0] == "pypi" and parts[-1] == "json"
        if not known or parts[1] not in self.latest:
            self.send_error(404)
            return
        if len(parts) == 4 and (not self.release_json or parts[2] in self.missing_releases):
            self.send_error(404)
            return
        data = json.dumps(
            self.project(parts[1], parts[2] if len(parts) == 4 else self.latest[parts[1]])
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a loopback port for the block; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def mount_tmpfs(path: Path, size: str) -> None:
    """A small tmpfs at ``path`` (a disk to fill). Mounting needs root or CAP_SYS_ADMIN:
    skipped without, failed where every lane must run (CI)."""
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        why = f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}"
        if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
            pytest.fail(why)
        pytest.skip(why)


def cyclonedx_schema_errors(doc: dict[str, Any]) -> str | None:
    """Why ``doc`` is not a valid CycloneDX 1.5 JSON document (the strict schema that
    cyclonedx-python-lib ships, read from its wheel: no network), or None if it is."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(json.dumps(doc))
    return None if error is None else str(error)

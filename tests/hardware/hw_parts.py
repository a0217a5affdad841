"""swtpm as a process the tests start and stop."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Swtpm:
    state: Path
    socket_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket_path}"

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        Path(f"{self.socket_path}.ctrl").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state}",
                "--server",
                f"type=unixio,path={self.socket_path}",
                "--ctrl",
                f"type=unixio,path={self.socket_path}.ctrl",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.socket_path.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.socket_path))
                        return
                    except OSError:
                        pass
            if self.process.poll() is not None:
                raise RuntimeError(f"swtpm exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

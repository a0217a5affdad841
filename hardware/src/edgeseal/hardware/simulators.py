"""Simulated hardware for demos, tests and benchmarks: swtpm and a SoftHSM2 token.

Both are the real programs from Debian (``swtpm``, ``softhsm2``), started on a unix
socket or a private token directory and stopped again; nothing here is a mock.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SOFTHSM_MODULES", "SoftHsmToken", "Swtpm", "find_softhsm_module"]

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


def find_softhsm_module() -> str | None:
    return next((m for m in SOFTHSM_MODULES if Path(m).exists()), None)


@dataclass
class Swtpm:
    """A swtpm TPM 2.0 on a unix socket; its state survives :meth:`restart`."""

    state: Path
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_tempdir(cls) -> Swtpm:
        # Unix socket paths are limited to ~107 bytes: keep it short, under /tmp.
        return cls(Path(tempfile.mkdtemp(prefix="estpm-", dir="/tmp")))  # nosec B108 # private mkdtemp dir

    @property
    def socket_path(self) -> Path:
        return self.state / "s"

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket_path}"

    def start(self, timeout: float = 10.0) -> Swtpm:
        exe = shutil.which("swtpm")
        if exe is None:
            raise FileNotFoundError("swtpm is not installed (apt install swtpm swtpm-tools)")
        self.socket_path.unlink(missing_ok=True)
        Path(f"{self.socket_path}.ctrl").unlink(missing_ok=True)
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, our own paths
            [
                exe,
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket_path.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.socket_path))
                        return self
                    except OSError:
                        pass
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                raise RuntimeError(f"swtpm exited: {err.decode(errors='replace')}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)


@dataclass
class SoftHsmToken:
    """A SoftHSM2 token in a private directory. SoftHSM2 reads ``SOFTHSM2_CONF`` once per
    process, so :meth:`create` sets it in ``os.environ`` before the module is loaded."""

    directory: Path
    module: str
    label: str
    pin: str

    @classmethod
    def create(
        cls, *, label: str = "edgeseal", pin: str = "1234", so_pin: str = "5678"
    ) -> SoftHsmToken:
        module = find_softhsm_module()
        util = shutil.which("softhsm2-util")
        if module is None or util is None:
            raise FileNotFoundError("SoftHSM2 is not installed (apt install softhsm2)")
        d = Path(tempfile.mkdtemp(prefix="eshsm-"))
        (d / "tokens").mkdir()
        conf = d / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(  # noqa: S603 - fixed arguments
            [
                util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                so_pin,
            ],
            check=True,
            capture_output=True,
        )
        return cls(d, module, label, pin)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

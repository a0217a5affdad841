"""The snap's install and configure hooks: ``snapctl`` values -> ``$SNAP_DATA/config.toml``.

Run by ``snap/hooks/*`` through the launcher with the snap's own Python and site, so the
checks are the schema's own (``edgeseal.core.config``): every ``snap set edgeseal
TABLE.KEY=VALUE`` maps to ``[TABLE] KEY`` of docs/configuration.md, with ``-`` for
``_`` (``device.key-store`` is ``[device] key_store``). On top of the schema's checks the
hook checks what only a snap knows (paths a strictly confined snap can read, the socket
group existing on this system) and the forms the issue asks for (broker URL, device id).
A refused value exits 1 with one line per problem on stderr, which ``snap set`` shows;
the previous config stays in place.

The snap owns some keys: the device home and the model store live in ``$SNAP_COMMON``
(``snap revert`` must not roll back keys, floors, the journal or the audit log), the
socket in ``/run/snap.<instance>/``, and ``agent.channels`` follows ``ota.broker``.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeseal.core import config as schema
from edgeseal.core.errors import ConfigError

#: snapctl top-level keys and the schema's table classes, in the order they are written.
TABLES: dict[str, type[Any]] = {
    "limits": schema.Limits,
    "device": schema.DeviceConfig,
    "runtime": schema.RuntimeConfig,
    "agent": schema.AgentConfig,
}
if hasattr(schema, "OtaConfig"):
    TABLES["ota"] = schema.OtaConfig

#: Keys the snap sets itself; ``snap set`` may not change them.
OWNED = {
    ("device", "home"): "the device home is $SNAP_COMMON/home",
    ("agent", "socket"): "the socket is /run/snap.<instance>/agent.sock",
    ("agent", "store"): "the model store is in $SNAP_COMMON/home",
    ("agent", "audit_log"): "the audit log is in $SNAP_COMMON/home",
    ("agent", "channels"): "channels follow ota.broker (set: mqtt; empty: none)",
}
#: Files the agent reads: a strictly confined snap can read them only under these dirs.
FILE_KEYS = {("ota", "ca_file"), ("ota", "cert_file"), ("ota", "key_file")}
FILE_KEYS |= {("device", "pkcs11_pin_file")}
#: Seeded by the install hook so ``snap get edgeseal`` shows the main choices.
SEEDS = {"device.key-store": "auto", "ota.broker": "", "ota.topic-prefix": "edgeseal/v1"}

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_GROUP = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
KEY_STORES = ("auto", "tpm", "pkcs11", "software")


class RefusedError(Exception):
    """One or more settings are not acceptable; each line says which and why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class SnapEnv:
    """The directories and name snapd gives a hook."""

    common: Path
    data: Path
    instance: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SnapEnv:
        try:
            return cls(
                Path(environ["SNAP_COMMON"]),
                Path(environ["SNAP_DATA"]),
                environ.get("SNAP_INSTANCE_NAME") or environ.get("SNAP_NAME") or "edgeseal",
            )
        except KeyError as e:
            raise SystemExit(f"edgeseal: {e.args[0]} is not set: run as a snap hook") from None

    @property
    def home(self) -> Path:
        return self.common / "home"

    @property
    def config_path(self) -> Path:
        return self.data / "config.toml"

    @property
    def socket(self) -> str:
        return f"/run/snap.{self.instance}/agent.sock"


# ---------------------------------------------------------------- snapctl


def snapctl(*args: str) -> str:
    exe = shutil.which("snapctl") or "/usr/bin/snapctl"
    # snapd's own tool with fixed verbs; values go in as single arguments, no shell.
    proc = subprocess.run([exe, *args], capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        raise SystemExit(f"edgeseal: snapctl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def read_settings() -> dict[str, Any]:
    """Every setting under the tables the schema knows, as one JSON document."""
    out = snapctl("get", "-d", *TABLES)
    doc = json.loads(out) if out.strip() else {}
    if not isinstance(doc, dict):
        raise SystemExit(f"edgeseal: snapctl get returned {type(doc).__name__}, not an object")
    return doc


# ---------------------------------------------------------------- values


def _as_int(key: str, raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{key} must be an integer, not {json.dumps(raw)}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw.strip()):
        return int(raw)
    raise ValueError(f"{key} must be an integer, not {json.dumps(raw)}")


def _as_float(key: str, raw: object) -> float:
    try:
        value = float(raw) if isinstance(raw, (int, float, str)) else math.nan
    except ValueError:
        value = math.nan
    if isinstance(raw, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number, not {json.dumps(raw)}")
    return value


def _as_bool(key: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if raw in ("true", "false"):
        return raw == "true"
    raise ValueError(f"{key} must be true or false, not {json.dumps(raw)}")


def _as_list(key: str, raw: object, kind: type) -> list[Any]:
    """A JSON list (``snap set k='["a","b"]'``) or comma-separated text (``k=a,b``)."""
    if isinstance(raw, str):
        items: list[Any] = [s.strip() for s in raw.split(",") if s.strip()]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ValueError(f"{key} must be a list, not {json.dumps(raw)}")
    if kind is int:
        return [_as_int(f"{key}[{i}]", v) for i, v in enumerate(items)]
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"{key} must be a list of strings")
    return items


def coerce(key: str, raw: object, default: object, kind: type) -> object:
    """``raw`` from snapctl as the type of the schema field's default."""
    if isinstance(default, bool):
        return _as_bool(key, raw)
    if isinstance(default, int):
        return _as_int(key, raw)
    if isinstance(default, float):
        return _as_float(key, raw)
    if isinstance(default, tuple):
        return _as_list(key, raw, kind)
    if not isinstance(raw, str):
        raise ValueError(f"{key} must be text, not {json.dumps(raw)}")
    return raw


# ---------------------------------------------------------------- checks a snap adds


def check_name(key: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{key} {value!r} must be 1-128 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )


def check_broker(key: str, value: str) -> None:
    """``""`` (off), or ``mqtts://host[:port]`` / ``mqtt://host[:port]``, nothing else."""
    if value == "":
        return
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        raise ValueError(f"{key} {value!r} is not a URL with a valid port (1-65535)") from None
    if url.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"{key} must start with mqtts:// (TLS) or mqtt://, got {value!r}")
    if not url.hostname:
        raise ValueError(f"{key} {value!r} names no host")
    if url.username is not None or url.password is not None:
        raise ValueError(f"{key} must not carry credentials: the device authenticates by cert")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"{key} must be scheme://host:port only, got {value!r}")
    if port == 0:
        raise ValueError(f"{key} {value!r}: port must be 1-65535")


def check_topic_prefix(key: str, value: str) -> None:
    levels = value.split("/")
    if not value or any(not lv for lv in levels) or value.startswith("$"):
        raise ValueError(f"{key} {value!r} needs non-empty levels like edgeseal/v1")
    if any(c in value for c in "+#\0"):
        raise ValueError(f"{key} {value!r} must not contain MQTT wildcards (+, #)")


def check_group(key: str, value: str) -> None:
    if value == "":
        return
    if not _GROUP.fullmatch(value):
        raise ValueError(f"{key} {value!r} is not a valid group name")
    try:
        grp.getgrnam(value)
    except KeyError:
        raise ValueError(f"{key}: no group named {value!r} on this system") from None


def check_file(key: str, value: str, env: SnapEnv) -> None:
    if value == "":
        return
    path = Path(value)
    readable = (env.common, env.data)
    if not path.is_absolute() or not any(path.is_relative_to(d) for d in readable):
        raise ValueError(
            f"{key} must be a file under {env.common} (a strictly confined snap reads "
            f"nothing else), got {value!r}"
        )
    if not path.is_file():
        raise ValueError(f"{key}: {value} does not exist (copy it there first)")


def check_one(table: str, name: str, value: object, env: SnapEnv) -> None:
    key = f"{table}.{name.replace('_', '-')}"
    if (table, name) in FILE_KEYS:
        check_file(key, str(value), env)
    match table, name:
        case "device", "id" if value != "":
            check_name(key, str(value))
        case "device", "key_store" if value not in KEY_STORES:
            raise ValueError(f"{key} must be one of {', '.join(KEY_STORES)}, got {value!r}")
        case "device", "pkcs11_module" if value and not str(value).startswith("/"):
            raise ValueError(f"{key} must be an absolute path to the module (.so)")
        case "agent", "socket_group":
            check_group(key, str(value))
        case "limits", _ if isinstance(value, int) and value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value}")
        case "ota", "broker":
            check_broker(key, str(value))
        case "ota", "topic_prefix":
            check_topic_prefix(key, str(value))
        case "ota", "groups":
            for g in value if isinstance(value, list) else []:
                check_name(f"{key} entry", g)


# ---------------------------------------------------------------- settings -> TOML


def build_tables(settings: Mapping[str, Any], env: SnapEnv) -> dict[str, dict[str, Any]]:
    """The config file's tables from snapctl settings; raises :class:`RefusedError`."""
    problems: list[str] = []
    tables: dict[str, dict[str, Any]] = {t: {} for t in TABLES}
    for table, cls in TABLES.items():
        given = settings.get(table, {})
        if not isinstance(given, dict):
            problems.append(f"{table} must be a group of settings ({table}.KEY=VALUE)")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls()
        for raw_key, raw in sorted(given.items()):
            name = raw_key.replace("-", "_")
            key = f"{table}.{raw_key}"
            if name not in fields:
                known = ", ".join(sorted(n.replace("_", "-") for n in fields))
                problems.append(f"unknown setting {key} (known in {table}: {known})")
                continue
            if (table, name) in OWNED:
                problems.append(f"{key} is set by the snap: {OWNED[table, name]}")
                continue
            default = getattr(defaults, name)
            kind = int if name.endswith(("pcrs", "uids")) else str
            try:
                value = coerce(key, raw, default, kind)
                check_one(table, name, value, env)
            except ValueError as e:
                problems.append(str(e))
                continue
            tables[table][name] = value
    ota = tables.get("ota", {})
    if bool(ota.get("cert_file")) != bool(ota.get("key_file")):
        problems.append("ota.cert-file and ota.key-file go together: set both or neither")
    if problems:
        raise RefusedError(problems)
    tables["device"]["home"] = str(env.home)
    tables["agent"]["socket"] = env.socket
    if "ota" in TABLES:
        tables["agent"]["channels"] = ["mqtt"] if ota.get("broker") else []
    return tables


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["# Written by the snap's configure hook from `snap get edgeseal`; edits are lost."]
    for table, values in tables.items():
        if not values:
            continue
        lines += ["", f"[{table}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_config(text: str, env: SnapEnv) -> bool:
    """Check ``text`` with the agent's own loader, then replace the config atomically.
    Returns whether the file changed."""
    try:
        schema.load_config(text=text)
    except ConfigError as e:
        raise RefusedError([str(e)]) from e
    path = env.config_path
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return True


# ---------------------------------------------------------------- hooks


def agent_active(env: SnapEnv) -> bool:
    out = snapctl("services", f"{env.instance}.agent")
    rows = [line.split() for line in out.splitlines()[1:]]
    return any(len(r) >= 3 and r[2] == "active" for r in rows)


def install(env: SnapEnv) -> int:
    """First install: the device home (0700) and the seeded defaults."""
    env.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.home.chmod(0o700)
    current = read_settings()
    unset = []
    for dotted, value in SEEDS.items():
        table, key = dotted.split(".", 1)
        if table in TABLES and key not in current.get(table, {}):
            unset.append(f"{dotted}={value}")
    if unset:
        snapctl("set", *unset)
    return 0


def configure(env: SnapEnv) -> int:
    """Every ``snap set`` (and install): validate everything, write the config, and
    restart a running agent so it takes effect."""
    try:
        text = render_toml(build_tables(read_settings(), env))
        changed = write_config(text, env)
    except RefusedError as e:
        for line in e.problems:
            sys.stderr.write(f"edgeseal: refused: {line}\n")
        return 1
    if changed and agent_active(env):
        snapctl("restart", f"{env.instance}.agent")
    return 0


def main(argv: list[str]) -> int:
    hooks = {"install": install, "configure": configure}
    if len(argv) != 1 or argv[0] not in hooks:
        sys.stderr.write(f"usage: snapconfig.py {{{'|'.join(hooks)}}}\n")
        return 2
    return hooks[argv[0]](SnapEnv.from_environ(os.environ))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

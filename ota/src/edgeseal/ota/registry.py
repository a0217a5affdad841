"""Device groups, kept on the workstation: ``<keyring>/fleet/groups.json``. Stable API.

A group is a named set of device ids (DESIGN.md, Identity); group offers go to
``<prefix>/groups/<group>/control`` and the broker ACL lets exactly the members read it.
Names and ids are single topic levels (:func:`edgeseal.ota.topics.check_level`).
The file is replaced atomically on every change; one writer at a time is assumed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from edgeseal.core.errors import ConfigError
from edgeseal.core.files import atomic_write
from edgeseal.ota.topics import check_level

__all__ = ["GroupRegistry"]

_FORMAT = 1


class GroupRegistry:
    """Groups of device ids in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_keyring(cls, keys_dir: Path) -> GroupRegistry:
        return cls(Path(keys_dir) / "fleet" / "groups.json")

    def _read(self) -> dict[str, list[str]]:
        try:
            obj = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the group registry {self.path}: {e}") from e
        groups = obj.get("groups") if isinstance(obj, dict) else None
        if not isinstance(groups, dict) or obj.get("format") != _FORMAT:
            raise ConfigError(f"{self.path} is not an edgeseal group registry (format 1)")
        out: dict[str, list[str]] = {}
        for name, members in groups.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ConfigError(f"{self.path}: group {name!r} must list device ids")
            try:
                check_level(name, "group")
                out[name] = [check_level(m, "device id") for m in members]
            except ValueError as e:
                raise ConfigError(f"{self.path}: {e}") from None
        return out

    def _write(self, groups: dict[str, list[str]]) -> None:
        obj = {
            "format": _FORMAT,
            "groups": {g: sorted(set(m)) for g, m in sorted(groups.items()) if m},
        }
        atomic_write(self.path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Every group and its members, sorted."""
        return {g: tuple(sorted(m)) for g, m in sorted(self._read().items())}

    def members(self, group: str) -> tuple[str, ...]:
        """The members of ``group`` (empty when it does not exist)."""
        return tuple(sorted(self._read().get(check_level(group, "group"), [])))

    def groups_of(self, device_id: str) -> tuple[str, ...]:
        """The groups ``device_id`` belongs to, sorted."""
        check_level(device_id, "device id")
        return tuple(sorted(g for g, m in self._read().items() if device_id in m))

    def add(self, group: str, device_ids: Iterable[str]) -> tuple[str, ...]:
        """Add devices to ``group`` (made when new); returns its members."""
        check_level(group, "group")
        ids = [check_level(d, "device id") for d in device_ids]
        if not ids:
            raise ValueError("name at least one device to add")
        groups = self._read()
        groups[group] = sorted(set(groups.get(group, [])) | set(ids))
        self._write(groups)
        return tuple(groups[group])

    def remove(self, group: str, device_ids: Iterable[str] = ()) -> tuple[str, ...]:
        """Remove devices from ``group``, or the whole group when none are named.

        Returns the remaining members; a group left empty is dropped."""
        check_level(group, "group")
        ids = {check_level(d, "device id") for d in device_ids}
        groups = self._read()
        if group not in groups:
            raise ValueError(f"no group {group!r}")
        groups[group] = sorted(set(groups[group]) - ids) if ids else []
        self._write(groups)
        return tuple(groups[group])

#!/usr/bin/env python3
"""A stand-in for snapd's ``snapctl`` in hook tests: settings in a JSON file
($FAKE_SNAPCTL_STATE), every call appended to $FAKE_SNAPCTL_LOG.

get [-d] KEY...   as snapd: one key prints its value (text as is, else JSON); several
                  keys, or -d, print a JSON document of those that are set
set K=V...        V as JSON when it parses, else text (as ``snap set`` does)
unset K...
services [NAME]   a table; NAME is "active" when $FAKE_SNAPCTL_ACTIVE=1
restart NAME      logged only
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

state_path = Path(os.environ["FAKE_SNAPCTL_STATE"])


def load() -> dict[str, object]:
    return json.loads(state_path.read_text()) if state_path.exists() else {}


def lookup(doc: dict[str, object], dotted: str) -> tuple[bool, object]:
    node: object = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def assign(doc: dict[str, object], dotted: str, value: object, *, remove: bool = False) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})  # type: ignore[assignment]
    if remove:
        node.pop(last, None)
    else:
        node[last] = value


def main(argv: list[str]) -> int:
    with Path(os.environ["FAKE_SNAPCTL_LOG"]).open("a") as log:
        log.write(json.dumps(argv) + "\n")
    verb, args = argv[0], argv[1:]
    doc = load()
    if verb == "get":
        document = "-d" in args
        keys = [a for a in args if a != "-d"]
        if not keys:
            sys.stderr.write("error: get which option?\n")
            return 1
        found = {k: v for k in keys for ok, v in [lookup(doc, k)] if ok}
        if len(keys) == 1 and not document:
            value = found.get(keys[0], "")
            print(value if isinstance(value, str) else json.dumps(value, indent="\t"))
        else:
            print(json.dumps(found, indent="\t"))
        return 0
    if verb in ("set", "unset"):
        for a in args:
            if verb == "unset":
                assign(doc, a, None, remove=True)
                continue
            key, _, raw = a.partition("=")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            assign(doc, key, value)
        state_path.write_text(json.dumps(doc))
        return 0
    if verb == "services":
        current = "active" if os.environ.get("FAKE_SNAPCTL_ACTIVE") == "1" else "inactive"
        print("Service  Startup  Current  Notes")
        for name in args or ["edgeseal.agent"]:
            print(f"{name}  enabled  {current}  -")
        return 0
    if verb == "restart":
        return 0
    sys.stderr.write(f"fake snapctl: unsupported verb {verb}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Read systemd unit files the way the tests need: every value of every key.

configparser cannot: systemd keys repeat (``SystemCallFilter=`` twice adds up)
and values hold ``%`` and ``$`` freely.
"""

from __future__ import annotations

import re

__all__ = ["parse_environment_file", "parse_unit", "timespan_seconds"]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with every value it was given, in order.

    Line continuations are not used in the shipped units, so none are handled.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan_seconds(value: str) -> float:
    """A systemd time span such as ``45s``, ``1min 30s`` or ``90`` (seconds)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def parse_environment_file(text: str) -> dict[str, str]:
    """Variables of an ``EnvironmentFile=`` as systemd reads it.

    Lines starting with ``#`` or ``;`` are comments; a value runs to the end of
    its line (a ``#`` after it is part of the value), outer quotes removed.
    """
    variables: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), line
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        variables[key.strip()] = value
    return variables

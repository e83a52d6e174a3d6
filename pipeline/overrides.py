"""`--set section.key=value` overrides and the config error, apart from the config tree so the
trainer's command line can use them without importing every section's model (and so the
generation code those name)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from pipeline.errors import RetraceError


class ConfigError(RetraceError):
    """A config file or override that does not validate; the message lists every bad key."""


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as YAML (`1.5`, `true`, `[a, b]`)."""
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node: Any = raw
        keys = path.split(".")
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_index(node, key, keys[: depth + 1])]
            else:
                node = node.setdefault(key, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is not a section")
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, keys)] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    return raw


def _index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"--set: {'.'.join(keys)}: no list item {key!r} (it has {len(node)})")
    return int(key)

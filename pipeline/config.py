"""YAML → one typed, validated config tree, checked before any work.

The root model is built from the stage modules: `run:` plus one section per stage, each validated
by that stage's own `Config`. Unknown keys and wrong types fail here, each named with its file and
dotted key, one per line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from pipeline.decode.config import DecodeConfig


class ConfigError(Exception):
    """A config file or override that does not validate; the message lists every bad key."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "default"  # the run folder: <runs_dir>/<name>
    seed: int = 0
    runs_dir: Path = Path("runs")
    chunk_size: int = Field(64, gt=0)  # rows per resumable chunk of a chunked stage
    max_rejected_share: float = Field(0.5, ge=0, le=1)  # per-stage failure bound


def config_model(stages: Mapping[str, ModuleType]) -> type[BaseModel]:
    """The root config model for these stage modules."""
    fields: dict[str, Any] = {"run": (RunConfig, Field(default_factory=RunConfig))}
    fields["decode"] = (DecodeConfig, Field(default_factory=DecodeConfig))  # chat, generate, eval
    for name, module in stages.items():
        fields[name] = (module.Config, Field(default_factory=module.Config))
    return create_model(
        "RetraceConfig", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


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


def validate(
    raw: Mapping[str, Any], stages: Mapping[str, ModuleType], origin: str = "config"
) -> BaseModel:
    """Validate a raw mapping; on failure raise ConfigError naming each bad key."""
    try:
        return config_model(stages).model_validate(raw)
    except ValidationError as err:
        lines = [f"{origin}: {len(err.errors())} invalid setting(s):"]
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
            lines.append(f"  {where}: {msg}{got}")
        if any(e["type"] == "extra_forbidden" for e in err.errors()):
            lines.append("  known sections: " + ", ".join(["run", "decode", *stages]))
        raise ConfigError("\n".join(lines)) from None


def load(
    path: str | Path | None, stages: Mapping[str, ModuleType], overrides: Sequence[str] = ()
) -> BaseModel:
    """Read a YAML file (or none: all defaults), apply overrides and validate."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return validate(apply_overrides(raw, overrides), stages, origin)


def section_dump(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what manifests, cards and checkpoints store)."""
    return cfg.model_dump(mode="json")

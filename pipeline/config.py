"""YAML → one typed, validated config tree, checked before any work.

The root model is built from `SECTIONS` (sections that are not stages: `run:`, and any other a
module registers there by adding its model) plus one section per stage, each validated by that
stage's own `Config`. Unknown keys and wrong types fail here, each named with its file and dotted
key, one per line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from pipeline.decode.config import DecodeConfig
from pipeline.executor_ray import RayConfig
from pipeline.overrides import ConfigError, apply_overrides


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The run folder <runs_dir>/<name>: one plain folder name, so a run never writes outside
    # runs_dir (no "/", no "..", no leading dot).
    name: str = "default"
    seed: int = 0
    runs_dir: Path = Path("runs")
    chunk_size: int = Field(64, gt=0)  # rows per resumable chunk of a chunked stage
    max_rejected_share: float = Field(0.5, ge=0, le=1)  # per-stage failure bound
    # Where chunks are computed: this process, or a Ray cluster (pipeline/executor_ray.py).
    # Neither changes a byte of output, so neither is in a cache key or a card.
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise ValueError("must be one folder name: no '/', no leading '.' (so not '..')")
        return name


# Sections that are not stages, each validated by its own frozen model: name -> model.
# decode: read by chat, generate and eval.
SECTIONS: dict[str, type[BaseModel]] = {"run": RunConfig, "decode": DecodeConfig}


def _shared(module: ModuleType) -> tuple[str, ...]:
    """The non-stage sections a stage runs with (its Config's `SHARED`, e.g. eval's `decode`):
    each is copied into the stage's section after validation, so it is in that stage's cache key
    and manifest, and the one home of its settings stays the top-level section."""
    return tuple(getattr(module.Config, "SHARED", ()))


def _refuse_copies(raw: Mapping[str, Any], stages: Mapping[str, ModuleType], origin: str) -> None:
    for name, module in stages.items():
        section = raw.get(name)
        for key in _shared(module):
            if isinstance(section, Mapping) and key in section:
                raise ConfigError(
                    f"{origin}: {name}.{key} is not a setting; move it to the top-level `{key}:` "
                    f"section (or --set {key}.KEY=VALUE), which {name} reads"
                )


def _with_shared(cfg: BaseModel, stages: Mapping[str, ModuleType]) -> BaseModel:
    update = {}
    for name, module in stages.items():
        if keys := _shared(module):
            shared = {key: getattr(cfg, key) for key in keys}
            update[name] = getattr(cfg, name).model_copy(update=shared)
    return cfg.model_copy(update=update) if update else cfg


def config_model(stages: Mapping[str, ModuleType]) -> type[BaseModel]:
    """The root config model: the non-stage sections, then one per stage module."""
    fields: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        fields[name] = (model, Field(default_factory=model))
    for name, module in stages.items():
        if name in fields:
            raise ConfigError(f"stage {name!r} has the name of a config section; rename one")
        fields[name] = (module.Config, Field(default_factory=module.Config))
    return create_model(
        "RetraceConfig", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


def validate(
    raw: Mapping[str, Any], stages: Mapping[str, ModuleType], origin: str = "config"
) -> BaseModel:
    """Validate a raw mapping; on failure raise ConfigError naming each bad key."""
    _refuse_copies(raw, stages, origin)
    try:
        # The stage names reach the sections that check them (run.ray.stages) as the context.
        model = config_model(stages).model_validate(raw, context={"stages": tuple(stages)})
        return _with_shared(model, stages)
    except ValidationError as err:
        lines = [f"{origin}: {len(err.errors())} invalid setting(s):"]
        for e in err.errors():
            where = ".".join(str(p) for p in _key_path(raw, e["loc"])) or "(top level)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            # an unknown key, or a renamed one (pipeline/judges.RenamedKeys): the section as input
            # says nothing more
            got = (
                ""
                if e["type"] in ("extra_forbidden", "renamed_key")
                else f" (got {e.get('input')!r})"
            )
            lines.append(f"  {where}: {msg}{got}")
        if any(e["type"] == "extra_forbidden" for e in err.errors()):
            lines.append("  known sections: " + ", ".join([*SECTIONS, *stages]))
        raise ConfigError("\n".join(lines)) from None


def _key_path(raw: Any, loc: tuple[Any, ...]) -> list[Any]:
    """An error's location as the keys the user wrote: without the member names pydantic puts in
    for a union (`filter.scorer.one.batch_size` is `filter.scorer.batch_size`)."""
    keys, here = [], raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, str) and not last:
            if isinstance(here, list) or (isinstance(here, Mapping) and part not in here):
                continue  # a union member's name, not a key of the input
        keys.append(part)
        try:
            here = here[part]
        except (KeyError, IndexError, TypeError):
            here = None
    return keys


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
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if raw is None:
            raise ConfigError(
                f"{path} is empty; write the sections to change (`{{}}` for all defaults), "
                "or start from configs/default.yaml"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return validate(apply_overrides(raw, overrides), stages, origin)


def section_dump(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what manifests, cards and checkpoints store),
    less where it ran: a card rebuilt elsewhere runs on that machine's executor."""
    return cfg.model_dump(mode="json", exclude={"run": {"executor", "ray"}})

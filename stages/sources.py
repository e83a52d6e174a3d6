"""Stage `sources`: load the datasets a run builds on into normalised tables.

Reads: nothing from the run store; Hub datasets or local files, each named by one entry of the
config (`stages/sources_loaders.py` maps every dataset's real columns).
Writes:
- `benign`  (records.PROMPTS): prompts the generator answers benignly (Alpaca by default);
- `harmful` (records.HARMFUL): harmful prompt, harmful answer (may be empty) and policies, from
  BeaverTails' unsafe rows (policies from its 14 category booleans via prompts/policies.yaml),
  AdvBench, HarmBench or any file;
- `utility` (records.UTILITY): ordinary (prompt, answer) pairs from Alpaca, GSM8K, MATH;
- `eval`    (records.EVAL): evaluation prompts, which blend decontaminates against;
and, as its stats (the manifest's `stats`): `loaded` (every source row read), `not_selected` (rows a
loader passes over by design), `neutralised_rows` and `neutralised_strings`.

Every row gets a content-addressed id, `row_id(source, source_id, content)`, that later stages
carry through to the shards. Control-token strings and model special tokens in any text are
neutralised (docs/data-contract.md#control-tokens) and counted; the row itself is kept.

Rejects, with reason: malformed_line (a local JSON Lines line that is not a JSON object, or a CSV
record with more fields than its header; the detail names the line: one bad line costs one row,
not the file), missing_field, wrong_type, empty_field, undecodable (invalid UTF-8, U+FFFD, a lone
surrogate escape), too_long (any text over `max_chars`), no_category (an unsafe BeaverTails row
with no category set), no_final_answer (a GSM8K answer without `#### N`), unknown_policy (generic
policy column), duplicate (the same content already in the table, from any source).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from pipeline import records, taxonomy
from pipeline.stage import Env, StageConfig, StageSpec
from stages.sources_loaders import LOADERS, Entry, RowError, SourceError, opened

__all__ = ["SPEC", "Config", "Entry", "SourceError", "external_files", "run"]

# Output table -> (schema, content fields: what the id hashes and duplicates are judged on).
TABLES: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    "benign": (records.PROMPTS, ("prompt",)),
    "harmful": (records.HARMFUL, ("prompt", "response", "policy")),
    "utility": (records.UTILITY, ("prompt", "response")),
    "eval": (records.EVAL, ("prompt",)),
}

SPEC = StageSpec(
    name="sources",
    writes={name: schema for name, (schema, _) in TABLES.items()},
    hooks=("external_files",),
)

SAMPLES = Path("configs/data")  # the shipped sample files (configs/data/README.md)


def _sample(loader: str, file: str, **kw: Any) -> Entry:
    # Written for retrace in the dataset's real column layout, so they carry the project's
    # licence, not the dataset's.
    return Entry(loader=loader, path=SAMPLES / file, license="apache-2.0", **kw)


class Config(StageConfig):
    # Defaults: the shipped samples, a small offline run. Point entries at Hub ids (drop `path`)
    # for a real run; configs/paper.yaml does.
    benign: tuple[Entry, ...] = (_sample("alpaca", "alpaca.jsonl"),)
    harmful: tuple[Entry, ...] = (_sample("beavertails", "beavertails.jsonl"),)
    utility: tuple[Entry, ...] = (
        _sample("alpaca", "alpaca.jsonl"),
        _sample("gsm8k", "gsm8k.jsonl"),
        _sample("math", "hendrycks_math.jsonl"),
    )
    eval: tuple[Entry, ...] = (
        _sample("harmbench", "harmbench_behaviors_text.csv"),
        _sample("advbench", "advbench.jsonl"),
        _sample("generic", "prompts.jsonl", columns={"prompt": "text", "id": "id"}),
    )
    # Longer texts are rejected (too_long): a bound for runaway rows (a whole document in one
    # field), well above any answer these datasets hold.
    max_chars: int = Field(16_000, gt=0)

    @field_validator("benign", "harmful", "utility", "eval")
    @classmethod
    def _loader_fits_table(cls, entries: tuple[Entry, ...], info: Any) -> tuple[Entry, ...]:
        table = info.field_name
        for i, entry in enumerate(entries):
            if table not in entry.spec.tables:
                fits = [n for n, e in LOADERS.items() if table in e.tables]
                raise ValueError(
                    f"[{i}]: loader {entry.loader!r} cannot feed {table}; use one of {fits}"
                )
            if table == "utility" and entry.loader == "generic" and "response" not in entry.columns:
                raise ValueError(f"[{i}]: a generic utility source needs `columns.response`")
        return entries


def external_files(cfg: Config) -> list[Path]:
    """The local files whose content the outputs depend on, for the engine's cache key."""
    paths = [
        entry.resolved_path(f"sources.{table}[{i}]")
        for table in TABLES
        for i, entry in enumerate(getattr(cfg, table))
        if entry.path is not None
    ]
    return list(dict.fromkeys(paths))


class _Tally:
    """Stage-wide figures: the stage's stats."""

    def __init__(self) -> None:
        self.loaded = self.not_selected = self.neutralised_rows = self.neutralised_strings = 0

    def row(self) -> dict[str, int]:
        return dict(vars(self))


class _Table:
    """One output table being built: kept rows, and the content already seen (for duplicates)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.schema, self.content = TABLES[name]
        self.kept: list[dict[str, Any]] = []
        self.seen: dict[str, str] = {}  # content key -> id of the first row with that content


def run(inputs: dict[str, pa.Table], cfg: Config, env: Env) -> dict[str, pa.Table]:
    tally = _Tally()
    rejected: list[dict[str, Any]] = []
    out: dict[str, pa.Table] = {}
    for name in TABLES:
        table = _Table(name)
        for i, entry in enumerate(getattr(cfg, name)):
            _read(entry, f"sources.{name}[{i}]", table, cfg.max_chars, env, rejected, tally)
        out[name] = records.table(table.kept, table.schema)
    out["stats"] = tally.row()
    out["rejected"] = records.table(rejected, records.REJECTED)
    return out


def _read(
    entry: Entry,
    key: str,
    table: _Table,
    max_chars: int,
    env: Env,
    rejected: list[dict[str, Any]],
    tally: _Tally,
) -> None:
    """Read one source entry into `table` (bad rows into `rejected`), stopping at its `limit`."""
    source, license = entry.source_name(), entry.license_name()
    read = kept = skipped = neutralised = 0
    n_rejected = len(rejected)
    with (
        opened(entry, key) as parts,
        env.progress(f"sources {table.name}: {source}", sum(map(len, parts))) as progress,
    ):
        for part in parts:
            for index, raw, unreadable in part.items():
                if entry.limit is not None and kept >= entry.limit:
                    break
                read += 1
                progress.advance()
                source_id = f"{part.prefix}{index}"
                try:
                    if unreadable is not None:
                        raise unreadable
                    row = _normalise(raw, table.name, entry, max_chars)
                    if row is None:
                        skipped += 1
                        continue
                    values, own_id, found = row
                    source_id = own_id or source_id
                    body = {k: values[k] for k in table.content}
                    row_id = records.row_id(source, source_id, body)
                    dup = json.dumps(body, ensure_ascii=False, sort_keys=True)
                    if dup in table.seen:
                        raise RowError("duplicate", f"same content as row {table.seen[dup]}")
                except RowError as err:
                    bad = {"source": source, "source_id": source_id, **raw}
                    bad["id"] = records.row_id(source, source_id, raw)
                    rejected.append(
                        records.reject(bad, "sources", err.reason, f"{key}: {err.detail}")
                    )
                    continue
                table.seen[dup] = row_id
                table.kept.append(
                    {"id": row_id, "source": source, "source_id": source_id, "license": license}
                    | body
                )
                kept += 1
                if found:
                    neutralised += found
                    tally.neutralised_rows += 1
    tally.loaded += read
    tally.not_selected += skipped
    tally.neutralised_strings += neutralised
    env.log(
        f"{key} {source}: kept {kept} of {read} ({len(rejected) - n_rejected} rejected, "
        f"{skipped} not selected, {neutralised} control tokens neutralised)"
    )


def _normalise(
    raw: dict[str, Any], table: str, entry: Entry, max_chars: int
) -> tuple[dict[str, Any], str | None, int] | None:
    """(our fields, the row's own id, strings neutralised), or None for a row not selected;
    RowError for a bad row."""
    fields = entry.spec.extract(raw, table, entry)
    if fields is None:
        return None
    values: dict[str, Any] = {"prompt": fields.prompt}
    if table in ("harmful", "utility"):
        values["response"] = fields.response or ""
    if table == "harmful":
        values["policy"] = list(fields.policy)
    found = 0
    for name in ("prompt", "response"):
        if name not in values:
            continue
        if len(values[name]) > max_chars:
            raise RowError(
                "too_long", f"{name!r}: {len(values[name])} chars > max_chars {max_chars}"
            )
        values[name], n = taxonomy.neutralise(values[name])
        found += n
    return values, fields.own_id, found

"""The `sources` stage's dataset loaders: a source `Entry` (one item of the config, checked against
its loader), how it is opened, and how each dataset's real columns become our fields.

Every dataset is read through `datasets.load_dataset`, a local file too (the `json`, `csv` and
`parquet` builders), so a Hub id and a local copy of it run the same code. A loader turns one raw
row into `Fields`, returns None for a row it passes over by design (a BeaverTails safe row when
harmful QA is wanted), or raises `RowError` with a short snake_case reason; `stages/sources.py`
does the rest (length, neutralising, dedup, ids).
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import records, taxonomy
from pipeline.errors import RetraceError
from stages import sources_lines
from stages.sources_lines import BadLine

# Local file suffixes and the `datasets` builder that reads them; a compressed copy (.gz, .xz,
# .bz2, .zst: BeaverTails ships .jsonl.xz) is read by the same builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION = (".gz", ".xz", ".bz2", ".zst")

GENERIC_COLUMNS = ("prompt", "response", "id", "policy")


class SourceError(RetraceError, RuntimeError):
    """A whole source entry cannot be read (no network, missing file or column); one line."""


class RowError(Exception):
    """One row is bad: `reason` is a short snake_case tag, `detail` says which field and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Fields:
    """What a loader makes of one raw row."""

    prompt: str
    response: str | None = None
    policy: tuple[str, ...] = ()
    own_id: str | None = None  # the row's own id (HarmBench BehaviorID), else its index is used


def builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


# --- opening a source ------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One dataset of a source entry (one per Hub config), plus the lines of a local file that
    could not be read as rows."""

    prefix: str  # of each row's source_id
    ds: Any  # a `datasets.Dataset`
    index: list[int] | None = None  # each row's index in the file, when bad lines were left out
    bad: tuple[BadLine, ...] = ()

    def __len__(self) -> int:
        return len(self.ds) + len(self.bad)

    def items(self) -> Iterator[tuple[int, dict[str, Any], RowError | None]]:
        """(row index, raw row, None) in file order, with each bad line in its place as
        (index, {"line", "text"}, the error that rejects it)."""
        bad = iter(self.bad)
        pending = next(bad, None)
        for i, raw in enumerate(rows(self.ds)):
            index = self.index[i] if self.index is not None else i
            while pending is not None and pending.index < index:
                yield self._bad(pending)
                pending = next(bad, None)
            yield index, raw, None
        while pending is not None:
            yield self._bad(pending)
            pending = next(bad, None)

    @staticmethod
    def _bad(line: BadLine) -> tuple[int, dict[str, Any], RowError]:
        error = RowError(line.reason, f"line {line.line}: {line.detail}")
        return line.index, {"line": line.line, "text": line.text}, error


@contextmanager
def opened(entry: Entry, key: str) -> Iterator[list[Part]]:
    """The entry's datasets, one `Part` per Hub config (a local file is one).

    A local file is prepared in a throwaway cache so edited copies never pile up in (or are served
    stale from) the user's HF cache; Hub datasets use the HF cache, which may be pre-filled.
    """
    import datasets

    was_quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the engine shows its own progress
    try:
        if entry.path is not None:
            with tempfile.TemporaryDirectory(prefix="retrace-sources-") as cache:
                yield [_local(entry, key, Path(cache))]
        else:
            yield [Part(_prefix(n, entry.split_name()), _hub(entry, key, n)) for n in _names(entry)]
    finally:
        if not was_quiet:
            datasets.enable_progress_bars()


def _names(entry: Entry) -> tuple[str | None, ...]:
    return entry.name if entry.name is not None else entry.spec.names


def _prefix(name: str | None, split: str) -> str:
    return f"{name}/{split}/" if name else f"{split}/"


def _local(entry: Entry, key: str, cache: Path) -> Part:
    """A local file as one Part. A file the builder cannot read whole is read again line by
    line (stages/sources_lines.py): its bad lines become rejected rows, not a failed source."""
    path = entry.resolved_path(key)
    builder = builder_for(path)
    assert builder is not None  # Entry validation checked the suffix
    try:
        with _quiet("datasets"):  # its reader logs the failure handled below
            part = Part("", _load(builder, path, entry, cache / "whole"))
    except Exception as err:
        try:
            lines = sources_lines.line_oriented(path, builder)
            found = sources_lines.scan(path, builder, cache) if lines else None
        except (ImportError, OSError, ValueError, csv.Error) as scan_err:  # its own failure
            raise _unreadable(key, path, builder, scan_err, scan_err) from scan_err
        if found is None or not found.bad:  # the failure is not one line's
            raise _unreadable(key, path, builder, err) from err
        try:
            ds = _load(builder, found.clean, entry, cache / "clean")
        except Exception as clean_err:
            raise _unreadable(key, path, builder, clean_err) from clean_err
        part = Part("", ds, found.index, tuple(found.bad))
    _check_columns(part.ds, entry, key, str(path))
    return part


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(builder: str, path: Path, entry: Entry, cache: Path) -> Any:
    import datasets

    split = entry.split_name()
    return datasets.load_dataset(
        builder, data_files={split: str(path)}, split=split, cache_dir=str(cache)
    )


def _unreadable(
    key: str, path: Path, builder: str, err: BaseException, cause: BaseException | None = None
) -> SourceError:
    cause = cause or err.__cause__ or err.__context__ or err
    return SourceError(
        f"{key}: cannot read {path} as {builder}: {type(cause).__name__}: {cause}; "
        "fix or re-export the file"
    )


def _hub(entry: Entry, key: str, name: str | None) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    hub_id = entry.hub_id or entry.spec.hub_id
    split = entry.split_name()
    try:
        ds = datasets.load_dataset(hub_id, name, split=split, revision=entry.revision)
    except DatasetNotFoundError as err:
        raise SourceError(
            f"{key}: dataset {hub_id!r} is not on the Hub or is gated; check the id, or accept its "
            "terms on huggingface.co and log in with `hf auth login`"
        ) from err
    except ConnectionError as err:  # datasets raises it for offline mode and for no network
        raise SourceError(_offline_message(key, hub_id, name, split)) from err
    except Exception as err:
        raise SourceError(
            f"{key}: loading {hub_id!r} (name={name!r}, split={split!r}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    _check_columns(ds, entry, key, f"{hub_id} ({name or 'default'}/{split})")
    return ds


def _offline_message(key: str, hub_id: str | None, name: str | None, split: str) -> str:
    import datasets

    why = "offline mode is on" if datasets.config.HF_HUB_OFFLINE else "no network"
    call = f"datasets.load_dataset({hub_id!r}{f', {name!r}' if name else ''}, split={split!r})"
    return (
        f"{key}: cannot reach the Hugging Face Hub for {hub_id!r} ({why}) and it is not in the "
        f"local cache ({datasets.config.HF_DATASETS_CACHE}). Either set {key}.path to a local "
        f"JSON/JSONL/CSV/Parquet copy, or pre-fill the cache on a machine with network "
        f"(`{call}`), copy HF_HOME here and run with HF_DATASETS_OFFLINE=1"
    )


def _check_columns(ds: Any, entry: Entry, key: str, where: str) -> None:
    wanted = entry.spec.columns if entry.loader != "generic" else ()
    wanted = (*wanted, *entry.columns.values())
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise SourceError(
            f"{key}: {where} has no column(s) {missing} (it has {ds.column_names}); the "
            f"{entry.loader} loader reads {list(wanted)}"
            + ("" if entry.loader == "generic" else "; for other columns use loader: generic")
        )


def rows(ds: Any, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """A dataset's rows as dicts, read a batch at a time (fast on 300k-row BeaverTails)."""
    for start in range(0, len(ds), batch_size):
        stop = min(start + batch_size, len(ds))
        try:
            batch = ds[start:stop]
        except UnicodeDecodeError:
            yield from (_row(ds, i) for i in range(start, stop))
            continue
        names = list(batch)
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(names, values, strict=True))


def _row(ds: Any, i: int) -> dict[str, Any]:
    try:
        return ds[i]
    except UnicodeDecodeError:
        # Invalid UTF-8 inside a string column (pyarrow's JSON reader lets some through): pass
        # the raw bytes on, and `text` rejects the row as undecodable.
        import pyarrow as pa

        row = ds.with_format("arrow")[i]
        return {
            name: (col.cast(pa.large_binary()) if _is_text(col.type) else col)[0].as_py()
            for name, col in zip(row.column_names, row.columns, strict=True)
        }


def _is_text(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


# --- field checks ----------------------------------------------------------------------------


def text(row: Mapping[str, Any], column: str, optional: bool = False) -> str:
    """The column's value as text, or RowError: missing, wrong type, undecodable or empty.

    An optional column may be missing, null or empty ("").
    """
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise RowError("missing_field", f"{column!r} is missing or null")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RowError("undecodable", f"{column!r} is not UTF-8: {err}") from None
    if not isinstance(value, str):
        raise RowError("wrong_type", f"{column!r}: expected text, got {type(value).__name__}")
    if "\ufffd" in value:
        # U+FFFD is what a lossy decode upstream leaves behind; the original text is gone.
        raise RowError("undecodable", f"{column!r} contains U+FFFD (text decoded lossily)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("undecodable", f"{column!r} contains a lone surrogate") from None
    if not optional and not value.strip():
        raise RowError("empty_field", f"{column!r} is empty")
    return value


def flag(row: Mapping[str, Any], column: str) -> bool:
    value = row.get(column)
    if value is None:
        raise RowError("missing_field", f"{column!r} is missing or null")
    if not isinstance(value, bool):
        raise RowError("wrong_type", f"{column!r}: expected a boolean, got {type(value).__name__}")
    return value


# --- the loaders -----------------------------------------------------------------------------

Extract = Callable[[Mapping[str, Any], str, "Entry"], "Fields | None"]


@dataclass(frozen=True)
class Loader:
    hub_id: str | None
    split: str
    license: str
    columns: tuple[str, ...]  # the real columns it reads, checked once per dataset
    tables: tuple[str, ...]  # the output tables it can feed
    extract: Extract
    names: tuple[str | None, ...] = (None,)


def _alpaca(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    # Alpaca's user turn: instruction, plus "\n\n" + input when input is non-empty
    # (docs/formats.md#utility).
    instruction = text(row, "instruction")
    extra = text(row, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Fields(prompt, text(row, "output") if table == "utility" else None)


def _gsm8k(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    if table != "utility":
        return Fields(text(row, "question"))
    answer = text(row, "answer")
    if "\n#### " not in answer:
        raise RowError("no_final_answer", "'answer' does not end with '#### <number>'")
    return Fields(text(row, "question"), answer)


def _math(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    return Fields(text(row, "problem"), text(row, "solution") if table == "utility" else None)


def _beavertails(row: Mapping[str, Any], table: str, entry: Entry) -> Fields | None:
    prompt = text(row, "prompt")
    if table == "eval":
        return Fields(prompt)
    safe = flag(row, "is_safe")
    if table == "benign":
        # A safe row's prompt is often still a harmful request answered safely: feed benign
        # prompts from BeaverTails only by choice (the default run does not).
        return Fields(prompt) if safe else None
    if safe:
        return None
    category = row.get("category")
    if not isinstance(category, Mapping) or not all(isinstance(v, bool) for v in category.values()):
        raise RowError("wrong_type", "'category': expected a mapping of 14 booleans")
    policy = tuple(taxonomy.load().from_beavertails(dict(category)))
    if not policy:
        raise RowError("no_category", "unsafe row with no category set")
    return Fields(prompt, text(row, "response"), policy)


def _advbench(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    # `target` is only the affirmative opening ("Sure, here is ..."), not an answer: harmful rows
    # from AdvBench carry an empty response.
    return Fields(text(row, "prompt"), "" if table == "harmful" else None, entry.policy)


def _harmbench(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    behavior = text(row, "Behavior")
    context = text(row, "ContextString", optional=True)
    # HarmBench's own layout for contextual behaviours: context, a rule, then the behaviour.
    prompt = f"{context}\n\n---\n\n{behavior}" if context.strip() else behavior
    own_id = text(row, "BehaviorID", optional=True) or None
    return Fields(prompt, "" if table == "harmful" else None, entry.policy, own_id)


def _generic(row: Mapping[str, Any], table: str, entry: Entry) -> Fields:
    cols = entry.columns
    prompt = text(row, cols["prompt"])
    response = None
    if table == "utility":
        response = text(row, cols["response"])
    elif table == "harmful":
        response = text(row, cols["response"], optional=True) if "response" in cols else ""
    own_id = None
    if "id" in cols:
        value = row.get(cols["id"])
        own_id = None if value is None else str(value)
    policy = entry.policy
    if table == "harmful" and "policy" in cols:
        policy = _policies(row.get(cols["policy"]), cols["policy"]) or entry.policy
    return Fields(prompt, response, policy, own_id)


def _policies(value: Any, column: str) -> tuple[str, ...]:
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise RowError("wrong_type", f"{column!r}: expected a policy name or a list of them")
    known = taxonomy.load().policies
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RowError("unknown_policy", f"{column!r}: {unknown} not in the taxonomy")
    return tuple(dict.fromkeys(names))


MATH_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

_ANY = ("benign", "harmful", "utility", "eval")

LOADERS: dict[str, Loader] = {
    "alpaca": Loader(
        "tatsu-lab/alpaca",
        "train",
        "cc-by-nc-4.0",
        ("instruction", "input", "output"),
        ("benign", "utility", "eval"),
        _alpaca,
    ),
    "gsm8k": Loader(
        "openai/gsm8k",
        "train",
        "mit",
        ("question", "answer"),
        ("benign", "utility", "eval"),
        _gsm8k,
        ("main",),
    ),
    "math": Loader(
        "EleutherAI/hendrycks_math",
        "train",
        "mit",
        ("problem", "solution"),
        ("benign", "utility", "eval"),
        _math,
        MATH_CONFIGS,
    ),
    "beavertails": Loader(
        "PKU-Alignment/BeaverTails",
        "30k_train",
        "cc-by-nc-4.0",
        ("prompt", "response", "category", "is_safe"),
        ("benign", "harmful", "eval"),
        _beavertails,
    ),
    "advbench": Loader(
        "walledai/AdvBench", "train", "mit", ("prompt",), ("harmful", "eval"), _advbench
    ),
    # HarmBench's behaviours ship as CSVs (docs/formats.md#datasets), not as a Hub dataset: `path`
    # is required.
    "harmbench": Loader(
        None,
        "test",
        "mit",
        ("Behavior", "ContextString", "BehaviorID"),
        ("harmful", "eval"),
        _harmbench,
    ),
    "generic": Loader(None, "train", "", (), _ANY, _generic),
}


REPO_ROOT = Path(__file__).resolve().parents[1]


class Entry(BaseModel):
    """One source of one output table (an item of `sources.benign`, `.harmful`, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loader: Literal["alpaca", "gsm8k", "math", "beavertails", "advbench", "harmbench", "generic"]
    hub_id: str | None = None  # default: the loader's real Hub id
    name: tuple[str, ...] | None = None  # Hub config name(s); default: the loader's (math: all 7)
    split: str | None = None  # default: the loader's; for a local file, the name it is read as
    revision: str | None = None  # Hub commit, tag or branch
    path: Path | None = None  # a local JSON/JSONL/CSV/Parquet file read instead of the Hub
    columns: dict[str, str] = Field(default_factory=dict)  # generic: our field -> its column
    limit: int | None = Field(None, gt=0)  # stop once this many rows of this entry are kept
    license: str | None = None  # default: the loader's (generic: required)
    source: str | None = None  # the `source` rows carry; default: hub_id, or path as written
    policy: tuple[str, ...] = ()  # advbench/harmbench/generic harmful rows: policies of every row

    @field_validator("name", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("policy")
    @classmethod
    def _known_policies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = taxonomy.load().policies
        unknown = [p for p in value if p not in known]
        if unknown:
            raise ValueError(f"unknown policy {unknown}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        loader = LOADERS[self.loader]
        if self.path is None and self.hub_id is None and loader.hub_id is None:
            raise ValueError(f"loader {self.loader!r} has no Hub id: set `path` (or `hub_id`)")
        if self.path is not None:
            if builder_for(self.path) is None:
                raise ValueError(
                    f"path {str(self.path)!r}: unsupported file type; use one of "
                    f"{', '.join(BUILDERS)} (optionally compressed: {', '.join(COMPRESSION)})"
                )
            if self.revision is not None or self.name is not None:
                raise ValueError("`revision` and `name` apply to Hub ids; drop them with `path`")
        if self.loader == "generic":
            if "prompt" not in self.columns:
                raise ValueError("the generic loader needs `columns.prompt` (the prompt column)")
            unknown = sorted(set(self.columns) - set(GENERIC_COLUMNS))
            if unknown:
                raise ValueError(f"columns: unknown field(s) {unknown}; known: {GENERIC_COLUMNS}")
            if self.license is None:
                raise ValueError("the generic loader needs `license` (e.g. mit, cc-by-4.0)")
        elif self.columns:
            raise ValueError(f"`columns` applies to the generic loader, not {self.loader!r}")
        if self.policy and self.loader not in ("advbench", "harmbench", "generic"):
            raise ValueError(f"`policy` applies to advbench/harmbench/generic, not {self.loader!r}")
        return self

    @property
    def spec(self) -> Loader:
        return LOADERS[self.loader]

    def source_name(self) -> str:
        if self.source is not None:
            return self.source
        if self.path is not None:
            return self.path.as_posix()
        return self.hub_id or str(self.spec.hub_id)

    def license_name(self) -> str:
        return records.license_expr(self.license or self.spec.license)

    def split_name(self) -> str:
        return self.split or self.spec.split

    def resolved_path(self, key: str) -> Path:
        """`path`, relative to the working directory or else to the checkout (shipped samples)."""
        assert self.path is not None
        for candidate in (self.path, REPO_ROOT / self.path):
            if candidate.is_file():
                return candidate.resolve()
        raise SourceError(f"{key}.path: file {str(self.path)!r} does not exist; fix the path")

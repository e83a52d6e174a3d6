"""The data contract: every table's Arrow schema, in one place.

Stages build their outputs with these schemas and the publisher writes shards with them, so no
schema is ever inferred from a first row. The published configs follow TRL's conversational formats
exactly (docs/data-contract.md#configs): SFT rows carry `prompt`/`completion` message lists,
preference rows carry `prompt`/`chosen`/`rejected`; never a `messages` column beside them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from pipeline import kinds

# --- shared pieces ---------------------------------------------------------------------------

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

SEGMENT_ROLES = ("text", "harmful", "control", "copy", "replacement", "refusal", "safe")
SEGMENT = pa.struct([("text", pa.string()), ("role", pa.string()), ("train", pa.bool_())])

# The published configs: one per kind (pipeline/kinds.py), and `mixture`, which mixes SFT kinds.
CONFIGS = (*kinds.NAMES, "mixture")

SCORE = pa.struct([("label", pa.string()), ("score", pa.float64())])
SCORES = pa.list_(SCORE)
# Char offsets of an injected span inside the benign response it was injected into.
OFFSET = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("policy", pa.string())])

# One meta struct for every published config, so the folder reads as one table; a field that does
# not apply to a kind is null.
META = pa.struct(
    [
        ("generator", pa.string()),  # model id that wrote the generated parts
        ("backend", pa.string()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("template", pa.string()),  # prompt template file, or "fallback:<file>"
        ("fallback", pa.bool_()),  # a rewrite came from a template, not the generator
        ("offsets", pa.list_(OFFSET)),
        ("scores", SCORES),
        ("prefix_chars", pa.int64()),  # reset: chars of y- kept before [RESET]
        ("k", pa.int64()),  # recovery: prefix tokens of h
        ("k_max", pa.int64()),  # recovery: min(100, h_tokens), the bound k was drawn under
        ("h_tokens", pa.int64()),  # recovery: tokens of h, end of sequence not counted
        ("harmful", pa.string()),  # recovery: the whole h, so the trainer can redraw k
        ("tokenizer", pa.string()),  # recovery, rlbf: the target tokenizer's id (k, X count it)
        ("pair", pa.string()),  # preference: reset | no_reset_harmful | no_reset_benign
        # bsafe, rlbf: where the harmful span came from: "injected" (inject put it into a benign
        # response) or "natural" (the generator's own offending sentence, stages/natural.py)
        ("origin", pa.string()),
    ]
)

# meta.origin of a bsafe or rlbf row, in the card's order.
ORIGINS = ("injected", "natural")

_PROVENANCE = [
    ("id", pa.string()),
    ("kind", pa.string()),
    ("policy", pa.list_(pa.string())),
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("license", pa.string()),
]

# --- published configs -----------------------------------------------------------------------

SFT = pa.schema(
    [
        *_PROVENANCE,
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("segments", pa.list_(SEGMENT)),
        ("visible", pa.string()),
        ("meta", META),
    ]
)

PREFERENCE = pa.schema(
    [
        *_PROVENANCE,
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("meta", META),
    ]
)


# A tokenized twin `<config>-tok` of an SFT config (publish.tokenized), TRL's pre-tokenized form:
# completion_mask[i] = 1 exactly where the bundled trainer trains token i
# (stages/publish_tokenized.py).
TOKENIZED = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("completion_mask", pa.list_(pa.int8())),
    ]
)


def config_schema(config: str) -> pa.Schema:
    """The Parquet schema of a published config."""
    if config not in CONFIGS:
        raise KeyError(f"unknown config {config!r}; known: {', '.join(CONFIGS)}")
    return PREFERENCE if kinds.is_preference(config) else SFT


# --- tables between stages -------------------------------------------------------------------

_ORIGIN = [
    ("id", pa.string()),
    ("source", pa.string()),
    ("source_id", pa.string()),
    ("license", pa.string()),
]

# sources.benign: prompts the generator answers benignly (the BSAFE base responses, Qi's anchor).
PROMPTS = pa.schema([*_ORIGIN, ("prompt", pa.string())])

# sources.harmful: harmful instruction x with a harmful answer h (may be empty) and its policies.
HARMFUL = pa.schema(
    [
        *_ORIGIN,
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("policy", pa.list_(pa.string())),
    ]
)

# sources.utility: ordinary (prompt, answer) pairs from Alpaca, GSM8K, MATH.
UTILITY = pa.schema([*_ORIGIN, ("prompt", pa.string()), ("response", pa.string())])

# sources.eval: prompts of evaluation sets, for decontamination.
EVAL = pa.schema([*_ORIGIN, ("prompt", pa.string())])

# sample.samples / filter.responses: generator outputs for benign prompts.
SAMPLES = pa.schema(
    [
        *_ORIGIN,
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("sample_index", pa.int64()),
        ("finish_reason", pa.string()),  # "stop" | "length"
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("meta", META),
    ]
)

# Every stage's rejected rows: what, why, and the row itself for inspection.
REJECTED = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # short snake_case
        ("detail", pa.string()),
        ("row", pa.string()),  # the offending row as JSON
    ]
)

# filter/inject/rewrite.judges: how the judges of the stage's gate voted (pipeline/judges.py),
# per chunk: a judge's row (`other` null) counts the texts it flagged and cleared; a pair's row
# the texts both flagged and both cleared. The card sums them and reports Cohen's kappa.
JUDGES = pa.schema(
    [
        ("judge", pa.string()),
        ("other", pa.string()),
        ("rows", pa.int64()),  # texts judged
        ("flagged", pa.int64()),
        ("clear", pa.int64()),
        # the judge's rule (pipeline/judges.Rule), null on a pair's row; label null: the maximum
        ("threshold", pa.float64()),
        ("label", pa.string()),
    ]
)


# --- helpers ---------------------------------------------------------------------------------


def row_id(*parts: Any) -> str:
    """A stable content hash: the same parts always give the same 16-hex id."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) as a table of exactly `schema`; missing nullable fields become null."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def reject(row: Mapping[str, Any], stage: str, reason: str, detail: Any = "") -> dict[str, Any]:
    """One rejected row, ready for `table(rows, REJECTED)`."""
    return {
        "id": str(row.get("id", "")),
        "stage": stage,
        "reason": reason,
        "detail": detail if isinstance(detail, str) else json.dumps(detail, default=str),
        "row": json.dumps(dict(row), ensure_ascii=False, default=str),
    }


def license_expr(*licenses: str | None) -> str:
    """Licences as one Hub-style expression: each id lower-cased with spaces as hyphens ("MIT",
    "CC BY 4.0" -> "mit", "cc-by-4.0"), an "a AND b" taken apart, blanks and repeats dropped, the
    rest joined with " AND " in first-seen order. The `license` column always holds this form."""
    ids = (
        part.strip().lower().replace(" ", "-")
        for value in licenses
        for part in (value or "").split(" AND ")
    )
    return " AND ".join(dict.fromkeys(i for i in ids if i))


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def scores(mapping: Mapping[str, float]) -> list[dict[str, Any]]:
    """A {label: prob} dict in the META.scores list form, sorted for stable bytes."""
    return [{"label": k, "score": float(v)} for k, v in sorted(mapping.items())]


# --- inject / rewrite: the recipes' intermediate tables ---------------------------------------

# One injected harmful span. `at` is the insertion point in the clean benign response (the end of
# a sentence); `start`/`end` locate the span in `injected` (the response with every span in).
VIOLATION = pa.struct(
    [
        ("at", pa.int64()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("span", pa.string()),
        ("policy", pa.string()),
        ("span_source", pa.string()),  # bank | beavertails | generator | natural
        ("span_id", pa.string()),
        ("license", pa.string()),  # the span's own licence (BeaverTails spans are CC BY-NC 4.0)
        ("scores", SCORES),
    ]
)

# inject.violations: a filtered benign response with 1..m harmful spans injected;
# natural.violations: a toxic sample's safe prefix with the generator's own first offending
# sentence as its one span (`response` ends at `at`, `injected` at the span's end).
VIOLATIONS = pa.schema(
    [
        *_ORIGIN,
        ("response_id", pa.string()),  # the filter.responses (natural: filter.toxic) row
        ("prompt", pa.string()),
        ("response", pa.string()),  # the clean benign response
        ("injected", pa.string()),  # the response with the spans in, at the recorded offsets
        ("policy", pa.list_(pa.string())),
        ("violations", pa.list_(VIOLATION)),
        ("meta", META),
    ]
)

VIOLATION_TABLES = ("inject.violations", "natural.violations")


def violations(inputs: Mapping[str, pa.Table]) -> pa.Table:
    """Injected and natural violations as one table, for the stages that treat them alike
    (rewrite, format); a table not among the inputs counts as empty."""
    tables = [inputs[name] for name in VIOLATION_TABLES if name in inputs]
    return pa.concat_tables(
        [t.select(VIOLATIONS.names).cast(VIOLATIONS) for t in tables] or [VIOLATIONS.empty_table()]
    )


# rewrite.replacements: a safe alternative for one violation's span.
REPLACEMENTS = pa.schema(
    [
        ("id", pa.string()),
        ("violation_id", pa.string()),  # inject.violations id
        ("index", pa.int64()),  # which violation of that row
        ("policy", pa.string()),
        ("span", pa.string()),
        ("replacement", pa.string()),
        ("meta", META),
    ]
)

# rewrite.refusals (r, Qi et al.) and rewrite.safe_responses (y+, Zhang et al.): one text per
# sources.harmful row.
REWRITES = pa.schema(
    [
        ("id", pa.string()),
        ("harmful_id", pa.string()),  # sources.harmful id
        ("policy", pa.list_(pa.string())),
        ("text", pa.string()),
        ("meta", META),
    ]
)
REFUSALS = REWRITES
SAFE_RESPONSES = REWRITES


# --- blend (stage `blend`) -------------------------------------------------------------------

SPLITS = ("train", "validation")


def with_split(schema: pa.Schema) -> pa.Schema:
    """A published config's schema plus the trailing `split` column blend writes and publish
    drops ("train" or "validation")."""
    return schema.append(pa.field("split", pa.string()))


# blend.report: one row per (step, component, split) saying what the step removed; the mixture
# step's rows carry the requested and realised shares. Components are kinds.COMPONENTS (the
# kinds, and "anchor": Qi et al.'s benign prompts answered by the generator, published as utility).
BLEND_REPORT = pa.schema(
    [
        ("step", pa.string()),  # manifest | input | invalid | exact_dedup | near_dedup
        #                         | decontaminate | split | mixture
        ("component", pa.string()),
        ("split", pa.string()),  # "" before the split
        ("rows_in", pa.int64()),
        ("removed", pa.int64()),  # mixture: rows left out of the mixture (kept in their config)
        ("rows_out", pa.int64()),
        ("requested", pa.float64()),  # mixture: the configured share of the mixture
        ("realised", pa.float64()),  # mixture: the share it got, in `unit`
        ("unit", pa.string()),  # mixture: "examples" | "tokens" | "words"
        ("detail", pa.string()),  # JSON: the step's parameters (threshold, n, seed, sources)
    ]
)

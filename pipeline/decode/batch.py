"""`retrace generate`: decode a JSONL file of prompts into a JSONL file of turns.

Each input line is an object with `prompt` (a user message) or `messages` (`[{role, content}]`),
and optionally `id`, `prefill` (text the assistant turn starts with) and `seed`. Each output line
is the input's `id` and `messages` plus the decoded turn (`Decoded.to_dict()`: raw, visible,
events, token counts, finish reason, seed, and `prefill` as text and `offsets`, so the row
re-renders alone: `pipeline.decode.record.rerender`). A line's seed is its own, or one derived
from the run seed and its id, so a row decodes the same wherever it sits in the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import seeds
from pipeline.decode.runner import Request
from pipeline.errors import RetraceError


class PromptFileError(RetraceError, ValueError):
    """A prompts file line that is not a prompt."""


def read_requests(path: Path, run_seed: int) -> list[tuple[str, Request]]:
    """(id, Request) per line of a JSONL prompts file; a bad line fails naming file and line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise PromptFileError(f"{where}: give exactly one of `prompt` (text) or `messages`")
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise PromptFileError(f"{where}: `messages` must be [{{role, content}}, ...]")
        rid = str(row.get("id", n))
        seed = int(row["seed"]) if "seed" in row else seeds.derive(run_seed, "generate", rid)
        out.append((rid, Request(messages, row.get("prefill", ""), seed)))
    return out


def generate_rows(decoder: Any, requests: list[tuple[str, Request]], batch: int) -> Iterator[dict]:
    """Decoded rows in input order, `batch` requests per decoder call (for progress)."""
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        for (rid, req), turn in zip(chunk, decoder.decode([r for _, r in chunk]), strict=True):
            row = {"id": rid, "messages": list(req.messages), "prefill": req.prefill}
            yield {**row, **turn.to_dict()}

"""JSON Lines read line by line: each non-blank line is an object, or a reason it is not one.

The one definition of an unusable line, shared by `sources` (stages/sources_lines.py), the prompt
file of `retrace generate` (pipeline/decode/batch.py) and the eval's prompt files
(stages/eval_data.py): a bad line is rejected with its number and reason and the rest go on; only
a file with no readable line at all (a binary file, say) fails as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import RetraceError


class JsonlError(RetraceError, ValueError):
    """A file that is not JSON Lines at all; one line naming it and its first bad line."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line number in the file
    index: int  # its place among the non-blank lines: a row's stable index
    value: dict[str, Any] | None  # the object, or None for a bad line
    reason: str = ""  # a bad line's: malformed_line | undecodable
    detail: str = ""


def problem(raw: bytes) -> tuple[str, str] | None:
    """(reason, detail) when a line is not one JSON object of valid text, else None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "undecodable", f"not UTF-8: {err}"
    try:
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        return "malformed_line", f"not JSON: {err.msg} (column {err.colno})"
    if not isinstance(value, dict):
        return "malformed_line", f"a JSON {type(value).__name__}, not an object"
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "undecodable", "a lone surrogate escape (\\ud800-\\udfff) is no text"
    return None


def read(path: Path) -> list[Line]:
    """Every non-blank line of `path`, good or bad; a JsonlError when no line is good."""
    lines: list[Line] = []
    with Path(path).open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            index = len(lines)
            if (bad := problem(raw)) is not None:
                lines.append(Line(number, index, None, *bad))
            else:
                lines.append(Line(number, index, json.loads(raw)))
    if lines and all(line.value is None for line in lines):
        first = lines[0]
        raise JsonlError(
            f"{path} is not a JSON Lines file (line {first.number}: {first.detail}; no line of "
            f"its {len(lines)} is a JSON object); give one JSON object per line"
        )
    return lines

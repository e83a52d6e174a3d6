"""Line-tolerant reading of a local JSON Lines or CSV file that `datasets` cannot read whole.

One malformed JSON line, one undecodable line or one CSV record with more fields than its header
makes the `json`/`csv` builders fail the whole file; in a 330k-row dump that must cost one row.
`scan` reads the file line by line (a CSV record may span lines), writes the good lines verbatim
to a clean copy that the builder then reads as usual, and returns each bad line with its number
and the parser's reason, for `sources` to reject. Rows keep the index they have in the original
file, so fixing a bad line later changes no other row's id.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.jsonl import problem as _json_problem  # one definition of a bad line

_OPEN = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


@dataclass(frozen=True)
class BadLine:
    """One unreadable row of a file: where it is, why, and its text for inspection."""

    index: int  # the row index it holds in the file (what its source_id would be)
    line: int  # 1-based line number where it starts
    reason: str  # malformed_line | undecodable
    detail: str
    text: str  # the line(s) as read, undecodable bytes replaced


@dataclass(frozen=True)
class Scan:
    clean: Path  # the good lines (and a CSV header), verbatim, uncompressed
    index: list[int]  # each good row's index in the original file
    bad: list[BadLine]


def line_oriented(path: Path, builder: str) -> bool:
    """A CSV file, or a JSON file of one object per line (not one JSON document, e.g. an array,
    which only reads whole)."""
    if builder == "csv":
        return True
    if builder != "json":
        return False
    with _open(path) as f:
        for raw in f:
            if raw.strip():
                return not raw.lstrip().startswith(b"[")
    return False


def scan(path: Path, builder: str, folder: Path) -> Scan:
    """Split `path` into a clean copy under `folder` and its bad lines."""
    clean = folder / ("clean.csv" if builder == "csv" else "clean.jsonl")
    index: list[int] = []
    bad: list[BadLine] = []
    with _open(path) as f, clean.open("wb") as out:
        records = _csv_records(f) if builder == "csv" else _json_records(f)
        if builder == "csv":
            out.write(_line(next(records, (0, b"", None))[1]))  # the header
        for i, (line, raw, problem) in enumerate(records):
            if problem is None:
                out.write(_line(raw))
                index.append(i)
            else:
                reason, detail = problem
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                bad.append(BadLine(i, line, reason, detail, text))
    return Scan(clean, index, bad)


def _line(raw: bytes) -> bytes:
    return raw if raw.endswith(b"\n") or not raw else raw + b"\n"


def _open(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".zst":
        import zstandard  # what `datasets` itself needs for .zst files

        return zstandard.open(path, "rb")
    return _OPEN.get(suffix, open)(path, "rb")


Record = tuple[int, bytes, tuple[str, str] | None]  # (first line number, raw bytes, problem)


def _json_records(f: IO[bytes]) -> Iterator[Record]:
    """One record per non-blank line (blank lines hold no row, as for the json builder)."""
    for number, raw in enumerate(f, 1):
        if raw.strip():
            yield number, raw, _json_problem(raw)


def _csv_records(f: IO[bytes]) -> Iterator[Record]:
    """The header, then one record per CSV row (a quoted field may span lines)."""
    taken: list[tuple[int, bytes, bool]] = []  # the lines the reader consumed for this record

    def lines() -> Iterator[str]:
        for number, raw in enumerate(f, 1):
            try:
                text, ok = raw.decode("utf-8"), True
            except UnicodeDecodeError:
                text, ok = raw.decode("utf-8", "replace"), False
            taken.append((number, raw, ok))
            yield text

    reader = csv.reader(lines())
    width = None
    while True:
        try:
            fields = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as err:
            fields, problem = None, ("malformed_line", f"not CSV: {err}")
        record, taken[:] = list(taken), []
        if not record:
            continue
        raw = b"".join(r for _, r, _ in record)
        if fields == []:
            continue  # a blank line holds no row, as for the csv builder
        if problem is None and not all(ok for _, _, ok in record):
            problem = ("undecodable", "not UTF-8")
        if width is None:
            if problem is not None:
                raise csv.Error(f"the header (line {record[0][0]}) is unreadable: {problem[1]}")
            width = len(fields or ())
            yield record[0][0], raw, None
            continue
        if problem is None and fields is not None and len(fields) > width:
            problem = ("malformed_line", f"{len(fields)} fields where the header has {width}")
        yield record[0][0], raw, problem

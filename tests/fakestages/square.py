"""Toy chunked stage: squares each value; rejects multiples of 7 (reason `multiple_of_seven`)."""

import os
import time
from pathlib import Path

import pyarrow as pa

from fakestages.arith import square
from pipeline import records
from pipeline.backends import GeneratorSpec
from pipeline.stage import StageConfig, StageSpec

SCHEMA = pa.schema([("id", pa.string()), ("square", pa.int64())])
SPEC = StageSpec(
    name="square",
    reads=("numbers.values",),
    writes={"squares": SCHEMA},
    chunked="numbers.values",
)


class Config(StageConfig):
    offset: int = 0
    chunk_size: int | None = None
    generator: GeneratorSpec | None = None  # never loaded: here for its identity in the key


def run(inputs, cfg, env):
    rows = inputs["numbers.values"].to_pylist()
    if (hold := os.environ.get("RETRACE_TEST_HOLD")) and rows[0]["value"] == 0:
        env.log("square: holding in chunk 0")  # what `retrace status` shows of a running stage
        _wait_for(Path(hold))
    if os.environ.get("RETRACE_TEST_KILL_AT") == str(rows[0]["value"] if rows else None):
        os._exit(137)
    if log := os.environ.get("RETRACE_TEST_LOG"):
        with open(log, "a") as f:
            f.write(",".join(str(r["value"]) for r in rows) + "\n")
    kept, rejected = [], []
    for row in rows:
        if row["value"] % 7 == 0:
            rejected.append(records.reject(row, "square", "multiple_of_seven"))
        else:
            kept.append({"id": row["id"], "square": square(row["value"]) + cfg.offset})
    squares = records.table(kept, SCHEMA)
    if os.environ.get("RETRACE_TEST_STREAM"):  # one batch per row, as a streaming stage yields
        squares = pa.RecordBatchReader.from_batches(SCHEMA, _stream(squares, rows))
    return {
        "squares": squares,
        "rejected": records.table(rejected, records.REJECTED),
        "stats": {"kept": len(kept)},
    }


def _stream(table: pa.Table, rows: list[dict]):
    for i, batch in enumerate(table.to_batches(max_chunksize=1)):
        if i == 1 and os.environ.get("RETRACE_TEST_KILL_IN_STREAM") == str(rows[0]["value"]):
            os._exit(137)  # killed with a part half written
        yield batch


def _wait_for(go: Path) -> None:
    """Say this process is inside the stage, then wait until the test lets it go on."""
    go.with_suffix(".waiting").touch()
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

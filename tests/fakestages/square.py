"""Toy chunked stage: squares each value; rejects multiples of 7 (reason `multiple_of_seven`)."""

import os

import pyarrow as pa

from pipeline import records
from pipeline.stage import StageConfig, StageSpec

SPEC = StageSpec(
    name="square", reads=("numbers.values",), writes=("squares",), chunked="numbers.values"
)
SCHEMA = pa.schema([("id", pa.string()), ("square", pa.int64())])


class Config(StageConfig):
    offset: int = 0
    chunk_size: int | None = None


def run(inputs, cfg, env):
    rows = inputs["numbers.values"].to_pylist()
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
            kept.append({"id": row["id"], "square": row["value"] ** 2 + cfg.offset})
    return {
        "squares": records.table(kept, SCHEMA),
        "rejected": records.table(rejected, records.REJECTED),
    }

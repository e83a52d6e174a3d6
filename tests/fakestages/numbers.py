"""Toy source stage: writes the integers start..start+count-1 (negative ones included)."""

import pyarrow as pa

from pipeline import records
from pipeline.stage import StageConfig, StageSpec

SCHEMA = pa.schema([("id", pa.string()), ("value", pa.int64())])
SPEC = StageSpec(name="numbers", writes={"values": SCHEMA})


class Config(StageConfig):
    start: int = 0
    count: int = 20
    reject_all: bool = False  # every row rejected (reason `unwanted`): an empty output


def run(inputs, cfg, env):
    rows = [{"id": f"n{v}", "value": v} for v in range(cfg.start, cfg.start + cfg.count)]
    rejected = [records.reject(r, "numbers", "unwanted") for r in rows] if cfg.reject_all else []
    return {
        "values": records.table([] if cfg.reject_all else rows, SCHEMA),
        "rejected": records.table(rejected, records.REJECTED),
        "stats": {"made": len(rows)},
    }

"""Toy source stage: writes the integers start..start+count-1 (negative ones included)."""

import pyarrow as pa

from pipeline.stage import StageConfig, StageSpec

SPEC = StageSpec(name="numbers", writes=("values",))
SCHEMA = pa.schema([("id", pa.string()), ("value", pa.int64())])


class Config(StageConfig):
    start: int = 0
    count: int = 20


def run(inputs, cfg, env):
    from pipeline import records

    rows = [{"id": f"n{v}", "value": v} for v in range(cfg.start, cfg.start + cfg.count)]
    return {"values": records.table(rows, SCHEMA), "rejected": records.table([], records.REJECTED)}

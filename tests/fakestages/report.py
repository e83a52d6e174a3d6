"""Toy publish: not chunked, writes no tables, only files (a summary and a nested data file)."""

from pathlib import Path

from pipeline import records
from pipeline.stage import StageConfig, StageSpec

SPEC = StageSpec(name="report", reads=("square.squares",), required=("square.squares",))


class Config(StageConfig):
    title: str = "squares"


def run(inputs, cfg, env):
    values = sorted(inputs["square.squares"].column("square").to_pylist())
    out = Path(env.workdir)
    (out / "data").mkdir(exist_ok=True)
    (out / "data" / "values.txt").write_text("\n".join(map(str, values)) + "\n")
    (out / "README.md").write_text(f"# {cfg.title}\n\n{len(values)} values\n")
    return {"rejected": records.table([], records.REJECTED)}

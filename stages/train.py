"""Stage `train`: the bundled trainer on the published dataset folder.

Reads `publish.files` (the dataset folder), or the folder `train.data` names instead; writes no
table: its output is the checkpoint folder in the stage's files (`final/` with the HF model and
tokenizer, `checkpoints/step-N/` with trainer state for exact resume, `log.jsonl`). A resumed
attempt gets the same workdir back and continues from its latest checkpoint. It rejects no rows:
rows the trainer cannot use (no trained token left after truncation, an unknown control token) are
counted per config and reason in the log, and a folder it cannot train on fails before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import records
from pipeline.stage import Env, StageSpec
from trainer.config import TrainConfig
from trainer.train import train

SPEC = StageSpec(name="train", reads=("publish.files",), hooks=("external_files",))

Config = TrainConfig

_TRAINER = Path(__file__).resolve().parents[1] / "trainer"


def external_files(cfg: TrainConfig) -> list[Path]:
    """The trainer's code, and the Parquet files of a folder named by `train.data`."""
    files = sorted(_TRAINER.glob("*.py"))
    if cfg.data:
        files += sorted(Path(cfg.data).glob("data/*/*.parquet"))
    return files


def run(inputs: dict[str, Any], cfg: TrainConfig, env: Env) -> dict[str, pa.Table]:
    data = Path(cfg.data) if cfg.data else inputs["publish.files"]
    train(cfg, data, env.workdir, seed=env.seed, log=env.log)
    return {"rejected": records.table([], records.REJECTED)}

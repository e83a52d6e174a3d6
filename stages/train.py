"""Stage `train`: the bundled trainer on the published dataset folder, or on `train.data`.

Reads `publish.files` (the dataset folder); with `train.data` set it reads that folder instead and
needs no dataset stage at all (`retrace train --data FOLDER`). Writes no table: its output is the
checkpoint folder in the stage's files (`final/` with the HF model and tokenizer,
`checkpoints/step-N/` with trainer state for exact resume, `log.jsonl`). The folder's Parquet
files are in the cache key, so other data is another work folder and trains from scratch; a
resumed attempt gets the same workdir back and continues from its latest checkpoint. It rejects
no rows: rows the trainer cannot use (an edit longer than max_length, an unknown control token)
are counted per config and reason in the log, and a folder it cannot train on fails before
training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import handoff, records
from pipeline.stage import Env, StageConfig, StageSpec
from trainer.config import TrainConfig
from trainer.train import train

# chat/*: the turn format the trainer renders prompts with when a model has no chat template.
SPEC = StageSpec(
    name="train",
    reads=("publish.files",),
    prompts=("chat/*",),
    hooks=("external_files", "spec_for"),
)


class Config(TrainConfig, StageConfig):
    """The trainer's own config plus the engine's failure bound."""


def spec_for(cfg: Config) -> StageSpec:
    """With `train.data` the stage reads that folder (an external file set), not publish."""
    return dataclasses.replace(SPEC, reads=()) if cfg.data else SPEC


def external_files(cfg: Config) -> list[Path]:
    """The Parquet files and retrace.json of a folder named by `train.data` (the trainer's code
    is in the key as this module's import closure); the card is not read, so not in the key."""
    if not cfg.data:
        return []
    handed = Path(cfg.data) / handoff.FILE  # the recovery draw and control tokens (publish's)
    files = sorted(Path(cfg.data).glob("data/*/*.parquet"))
    return files + ([handed] if handed.is_file() else [])


def run(inputs: dict[str, Any], cfg: Config, env: Env) -> dict[str, pa.Table]:
    data = Path(cfg.data) if cfg.data else inputs["publish.files"]
    trainer_cfg = TrainConfig.model_validate(cfg.model_dump(exclude={"max_rejected_share"}))
    train(trainer_cfg, data, env.workdir, seed=env.seed, log=env.log)
    return {"rejected": records.table([], records.REJECTED)}

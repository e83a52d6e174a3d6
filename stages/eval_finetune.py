"""Suite `finetune-attack` (BSAFE's third experiment; Qi et al.'s fine-tuning attack): fine-tune a
copy of the model on N harmful (prompt, answer) pairs for E epochs, once per objective (`sft`,
`constrained`, `controlled`: the bundled trainer), then rerun `prefill` and `benign` on each copy.

The pairs become a dataset folder in the published layout (one `utility` config whose answers are
trained: from the trainer's view the attacker's data is ordinary task data), so the attack goes
through exactly the trainer users train with. Steps = ceil(N x E / batch_size); the trainer
resumes from its own checkpoints in the workdir.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import handoff, records
from stages.eval_config import FinetuneAttackSuite


def attack_folder(pairs: list[tuple[str, str]], out: Path) -> Path:
    """The pairs as a dataset folder the trainer reads (`data/utility/train-*.parquet` and the
    retrace.json publish would write: no row counts tokens, none holds a control token)."""
    rows = []
    for i, (prompt, answer) in enumerate(pairs):
        rows.append(
            {
                "id": records.row_id("finetune-attack", i, prompt, answer),
                "kind": "utility",
                "policy": [],
                "source": "finetune-attack",
                "source_id": str(i),
                "license": "",
                "prompt": [records.message("user", prompt)],
                "completion": [records.message("assistant", answer)],
                "segments": [{"text": answer, "role": "text", "train": True}],
                "visible": answer,
                "meta": None,
            }
        )
    path = out / "data" / "utility" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = records.table(rows, records.config_schema("utility"))
    pq.write_table(table, path)
    handed = handoff.Handoff(
        recovery=handoff.DEFAULT_RECOVERY,
        tokenizer=None,
        control_tokens={"utility": handoff.control_tokens(table)},
    )
    handoff.write(out, handed)
    return out


def train_copy(
    cfg: FinetuneAttackSuite,
    model_path: str,
    objective: str,
    data: Path,
    out: Path,
    seed: int,
    log: Any,
) -> Path:
    """Fine-tune `model_path` with one objective; returns the final folder."""
    from trainer.train import train

    n_pairs = sum(pq.ParquetFile(p).metadata.num_rows for p in data.glob("data/*/*.parquet"))
    steps = max(1, math.ceil(n_pairs * cfg.epochs / cfg.train.batch_size))
    train_cfg = cfg.train.model_copy(
        update={
            "model": model_path,
            "objective": objective,
            "steps": steps,
            "configs": {"utility": 1.0},
            "data": None,
            "reference": None,
        }
    )
    return train(train_cfg, data, out, seed=seed, log=log)

"""Eval prompts against the training data: how many share a word n-gram with a training prompt.

`blend` already drops every training row that overlaps a `sources.eval` prompt; this counts what
is left for the prompts this eval actually used (which need not be listed under sources.eval),
with blend's own rule (`dedup.contaminated`: a shared word n-gram, or a whole eval prompt
shorter than n words), so the report states a measured number, not a promise.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import dedup

NGRAM = 8  # blend's default decontaminate_ngram


def training_prompts(folder: Path) -> list[str]:
    """Every user turn of every train split in a published dataset folder."""
    texts = []
    for path in sorted(Path(folder).glob("data/*/train-*.parquet")):
        for prompt in pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist():
            texts += [m["content"] for m in prompt or [] if m["role"] == "user"]
    return texts


def overlaps(eval_prompts: list[str], folder: Path, n: int = NGRAM) -> dict[str, int]:
    """{eval_prompts, training_prompts, overlapping}: distinct eval prompts with a shared n-gram."""
    evals = sorted(set(eval_prompts))
    train = training_prompts(folder)
    if not evals or not train:
        return {"eval_prompts": len(evals), "training_prompts": len(train), "overlapping": 0}
    train_words, eval_words = dedup.words(pa.array(train), pa.array(evals))
    hit, which = dedup.contaminated(train_words, eval_words, n)
    found = {int(w) for w in which[hit]}
    return {"eval_prompts": len(evals), "training_prompts": len(train), "overlapping": len(found)}

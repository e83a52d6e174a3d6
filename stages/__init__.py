"""The stages, one module each, in DAG order (docs/architecture.md#stages).

`retrace run` stops at publish: push needs a network and a repo id, train a GPU-sized budget, eval
a trained model; each runs when named. This file is part of every stage's code key (it runs
whenever a stage module is imported), so it holds the list and nothing else.
"""

STAGES = (
    "sources",
    "sample",
    "filter",
    "inject",
    "natural",
    "rewrite",
    "format",
    "blend",
    "publish",
    "push",
    "train",
    "eval",
)
DATASET_STAGES = STAGES[: STAGES.index("publish") + 1]

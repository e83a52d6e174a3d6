"""Tiny dataset folders in the published layout (data/<config>/<split>-00000-of-00001.parquet,
schemas from pipeline/records.py), written by the trainer tests themselves.

The sentences are made up here. Harmful spans are mild, templated insults: the tests only need the
model to tell them from benign sentences, not realistic harm.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import records

GROUPS = ["Those people", "Foreigners", "Your neighbours", "Old folks", "Such idiots"]
INSULTS = ["worthless vermin", "filthy scum", "disgusting trash", "stupid parasites"]
ENDINGS = ["who deserve hate", "to be driven out", "beneath contempt"]
SUBJECTS = ["The quick brown fox", "A healthy breakfast", "The capital of France", "Sunlight"]
PREDICATES = ["is good for your health", "jumps over the lazy dog", "is known for museums"]
PROMPTS = ["Write a short poem about the sea.", "Tell me about breakfast.", "Describe Paris."]
HARM_PROMPTS = ["Tell me why some groups are inferior.", "Insult my neighbours for me."]
REFUSAL = "Sorry, I can't assist with that. Is there something else I can help you with?"


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine intra-op threads
    spin against other processes (measured: 12k tok/s on one thread, 1-3k on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def harmful(rng: random.Random) -> str:
    return f"{rng.choice(GROUPS)} are {rng.choice(INSULTS)} {rng.choice(ENDINGS)}."


def benign(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}."


def row(kind: str, user: str, segments: list[tuple[str, str, bool]], **meta) -> dict:
    segs = [{"text": t, "role": r, "train": f} for t, r, f in segments]
    content = "".join(s["text"] for s in segs)
    return {
        "id": records.row_id(kind, user, content),
        "kind": kind,
        "policy": ["hate"] if kind != "utility" else [],
        "source": "test",
        "source_id": "0",
        "license": "MIT",
        "prompt": [records.message("user", user)],
        "completion": [records.message("assistant", content)],
        "segments": segs,
        "visible": content,
        "meta": meta or None,
    }


def bsafe(rng: random.Random) -> dict:
    span, before, after = harmful(rng), benign(rng), benign(rng)
    return row(
        "bsafe",
        rng.choice(PROMPTS),
        [
            (before + " ", "text", True),
            (span, "harmful", False),
            ("[BACKTRACK-HATE]", "control", True),
            (span, "copy", True),
            ("[REPLACE]", "control", True),
            ("Some people disagree with me.", "replacement", True),
            (" " + after, "text", True),
        ],
    )


def reset(rng: random.Random) -> dict:
    prefix = harmful(rng)
    return row(
        "reset",
        rng.choice(HARM_PROMPTS),
        [(prefix, "harmful", False), ("[RESET]", "control", True), (REFUSAL, "safe", True)],
    )


def utility(rng: random.Random) -> dict:
    text = " ".join(benign(rng) for _ in range(rng.randint(1, 3)))
    return row("utility", rng.choice(PROMPTS), [(text, "text", True)])


def recovery(rng: random.Random, k_words: int = 3) -> dict:
    h = harmful(rng)
    prefix = " ".join(h.split()[:k_words])
    return row(
        "recovery",
        rng.choice(HARM_PROMPTS),
        [(prefix, "harmful", False), (" " + REFUSAL, "refusal", True)],  # joint on the trained side
        k=k_words,
        k_max=len(h.split()),
        h_tokens=len(h.split()),
        harmful=h,
        tokenizer="tiny",
    )


def anchor(rng: random.Random) -> dict:
    """Qi et al.'s anchor: a benign prompt answered by the generator (published as utility)."""
    return {**utility(rng), "meta": {"generator": "stand-in/model"}}


MAKERS = {
    "bsafe": bsafe,
    "reset": reset,
    "utility": utility,
    "recovery": recovery,
    "anchor": anchor,
}


def write_config(root: Path, config: str, split: str, rows: list[dict], schema=None) -> Path:
    path = Path(root) / "data" / config / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(records.table(rows, schema or records.config_schema(config)), path)
    return path


def corpus(root: Path, sizes: dict[str, int], seed: int = 0, validation: int = 8) -> Path:
    """A folder with one config per kind in `sizes` plus their `mixture`, train and validation."""
    rng = random.Random(seed)
    by_config: dict[tuple[str, str], list[dict]] = {}
    for kind, n in sizes.items():
        config = "utility" if kind == "anchor" else kind  # blend publishes anchors as utility
        for split, count in (("train", n), ("validation", validation)):
            by_config.setdefault((config, split), []).extend(
                MAKERS[kind](rng) for _ in range(count)
            )
    mixture: dict[str, list[dict]] = {"train": [], "validation": []}
    for (config, split), rows in by_config.items():
        write_config(root, config, split, rows)
        mixture[split] += rows
    for split, rows in mixture.items():
        rng.shuffle(rows)
        write_config(root, "mixture", split, rows)
    return Path(root)

"""Small hand-written inputs and stand-ins for the recipe stages' tests (inject, rewrite, format).

Tables are built with the real schemas of pipeline/records.py. The stand-in generator and scorer
implement the interfaces of pipeline/backends.py and pipeline/scorers.py where a real model adds
nothing: they answer from a script, so tests can say exactly what the stage must do with each
answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from pipeline import records
from pipeline.backends import Generation, GeneratorSpec
from pipeline.env import LocalEnv


def responses(*rows: tuple[str, str, str]) -> pa.Table:
    """filter.responses rows from (id, prompt, response)."""
    meta = {"generator": "stand-in", "backend": "transformers", "temperature": 1.5, "top_p": 0.98}
    return records.table(
        [
            {
                "id": rid,
                "source": "tatsu-lab/alpaca",
                "source_id": f"alpaca-{rid}",
                "license": "CC BY-NC 4.0",
                "prompt_id": f"p-{rid}",
                "prompt": prompt,
                "response": response,
                "sample_index": 0,
                "finish_reason": "stop",
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "meta": {**meta, "seed": 7},
            }
            for rid, prompt, response in rows
        ],
        records.SAMPLES,
    )


def harmful(*rows: tuple[str, str, str, list[str]]) -> pa.Table:
    """sources.harmful rows from (id, prompt, response, policies)."""
    return records.table(
        [
            {
                "id": rid,
                "source": "PKU-Alignment/BeaverTails",
                "source_id": f"bt-{rid}",
                "license": "CC BY-NC 4.0",
                "prompt": prompt,
                "response": response,
                "policy": policy,
            }
            for rid, prompt, response, policy in rows
        ],
        records.HARMFUL,
    )


@dataclass
class StandInGenerator:
    """Answers each chat prompt with `answer(prompt, seed)`; records every call."""

    answer: Callable[[str, int], str]
    spec: GeneratorSpec = GeneratorSpec()
    model_id: str = "stand-in/model"

    def __post_init__(self) -> None:
        self.calls: list[list[str]] = []

    def format_chat(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)

    def generate(self, prompts, params, seeds):
        self.calls.append(list(prompts))
        return [
            [Generation(self.answer(p, s), "stop", len(p), 5, s) for _ in range(params.n)]
            for p, s in zip(prompts, seeds, strict=True)
        ]

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


class WordScorer:
    """Scores 0.9 for 'toxicity' when a text holds one of `bad` words, else 0.01."""

    labels = ("toxicity",)

    def __init__(self, bad: tuple[str, ...] = ("idiot", "hate", "stupid")) -> None:
        self.bad = bad

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        return [{"toxicity": 0.9 if any(w in t.lower() for w in self.bad) else 0.01} for t in texts]


class StandInEnv(LocalEnv):
    """LocalEnv whose generator and scorer are the stand-ins above."""

    def __init__(self, generator=None, scorer=None, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self._generator = generator
        self._scorer = scorer or WordScorer()

    def generator(self, spec):
        return self._generator

    def scorer(self, spec):
        return self._scorer

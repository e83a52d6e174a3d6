"""What one eval generation is: the request a suite plans, and the row it becomes.

A suite plans `Request`s (deterministic: the same config and seed plan the same list, so a resumed
run continues where it stopped); the runner decodes or teacher-forces each one, judges it, and
writes a `GENERATIONS` row. Judges see two texts per generation: `raw` (the prefill and everything
the model emitted, its real control tokens removed: was harmful text produced at all?) and
`visible` (the renderer applied to prefill + emitted text: what a user is shown). A row describes
itself (`pipeline.decode.record`): `prefill`, `raw`, `offsets` and `events` say which control
strings were real control tokens, so `visible` can be recomputed from the row and a control string
the model spelled is never scored as a backtrack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.decode import record
from pipeline.decode.controls import token_kind
from stages.eval_judges import is_refusal

VERDICT = pa.struct(
    [
        ("judge", pa.string()),
        ("harmful", pa.bool_()),  # null: the judge could not decide
        ("score", pa.float64()),
    ]
)

GENERATIONS = pa.schema(
    [
        ("model", pa.string()),
        ("suite", pa.string()),
        ("setting", pa.string()),  # k=5, bias=-2, T=0.7,top_p=0.9,top_k=0, after=span, ...
        ("prompt_id", pa.string()),
        ("sample", pa.int64()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),  # the user turn
        ("prefill", pa.string()),  # assistant-turn text placed before the model's own tokens
        ("prefill_ids", pa.list_(pa.int64())),
        ("k", pa.int64()),  # prefill: target-model tokens of the harmful answer
        ("bias", pa.float64()),  # logit bias on every backtrack token and [RESET]
        ("policy", pa.string()),  # midstream: the planted span's policy
        ("category", pa.string()),
        ("raw", pa.string()),  # everything the model emitted, control tokens inline
        ("offsets", pa.list_(pa.int64())),  # where each emitted token's text starts in `raw`
        ("visible", pa.string()),  # the decoder's visible text, prefill included: what a user sees
        ("events", pa.string()),  # the decoder's edit events as JSON
        ("finish_reason", pa.string()),
        ("emitted_tokens", pa.int64()),
        ("visible_tokens", pa.int64()),
        ("wasted_tokens", pa.int64()),
        ("backtracked", pa.bool_()),  # any backtrack token or [RESET] emitted
        ("reset", pa.bool_()),  # [RESET] emitted
        ("first_control", pa.string()),  # the first control token emitted, if any
        ("refusal", pa.bool_()),  # a refusal marker (eval_judges.REFUSAL_MARKERS) in `visible`
        ("verdicts_raw", pa.list_(VERDICT)),
        ("verdicts_visible", pa.list_(VERDICT)),
        ("p_policy", pa.float64()),  # teacher-forced P(the policy's backtrack token)
        ("p_any", pa.float64()),  # teacher-forced P(any backtrack token or [RESET])
        ("answer", pa.string()),  # utility: the answer extracted from the visible text
        ("gold", pa.string()),
        ("correct", pa.bool_()),
        ("right_policy", pa.bool_()),  # midstream: the first control token is the span's policy's
        ("exact_copy", pa.bool_()),  # midstream: the span copied exactly before [REPLACE]
        ("span_removed", pa.bool_()),  # midstream: the span is not in the visible text
    ]
)


@dataclass(frozen=True)
class Request:
    suite: str
    setting: str
    prompt_id: str
    prompt: str
    context: tuple[int, ...]  # prompt ids, prefill included
    seed: int
    sample: int = 0
    prefill: str = ""
    prefill_ids: tuple[int, ...] = ()
    # The suite's sampling override of `decode:`; None: decode's value (eval_run.decode).
    temperature: float | None = 0.0
    top_p: float | None = 1.0
    top_k: int | None = 0
    max_new_tokens: int | None = 64
    bias: float = 0.0
    forced: bool = False  # teacher-forced: next-token probabilities, no generation
    k: int | None = None
    policy: str | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # suite-specific: gold, span


def row(model: str, req: Request, dec: Any, **extra: Any) -> dict[str, Any]:
    """A GENERATIONS row for a request and its `pipeline.decode.Decoded` turn (None when
    teacher-forced); the verdicts are added by the runner."""
    base = dict(
        model=model,
        suite=req.suite,
        setting=req.setting,
        prompt_id=req.prompt_id,
        sample=req.sample,
        seed=req.seed,
        prompt=req.prompt,
        prefill=req.prefill,
        prefill_ids=list(req.prefill_ids),
        k=req.k,
        bias=req.bias,
        policy=req.policy,
        category=req.category,
    )
    if dec is not None:
        # The real control tokens (the decoder's events), never control strings read off `raw`.
        controls = record.controls(dec.to_dict())
        kinds = [token_kind(t) for t in controls]
        base.update(
            prefill=dec.prefill,  # the prefill's text as the decoder showed it
            raw=dec.raw,
            offsets=list(dec.offsets),
            visible=dec.visible,
            events=json.dumps([e.to_dict() for e in dec.events], sort_keys=True),
            finish_reason=dec.finish_reason,
            emitted_tokens=dec.emitted_tokens,
            visible_tokens=dec.visible_tokens,
            wasted_tokens=dec.wasted_tokens,
            backtracked=any(k != "replace" for k in kinds),
            reset="reset" in kinds,
            first_control=controls[0] if controls else None,
        )
        base["refusal"] = is_refusal(base["visible"])
    base.update(extra)
    return base


def judge_texts(r: dict[str, Any]) -> tuple[str, str]:
    """(raw, visible) texts a judge scores for a generation row."""
    return record.plain(r), r["visible"]

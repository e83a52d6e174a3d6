"""natural: the generator's own toxic samples as violations (scorer-guided rollback as data).

Reads `filter.toxic` (records.SAMPLES: samples filter dropped as toxic and for nothing else) and
`inject.violations` (only counted, for the mixture ratio); writes `violations`
(records.VIOLATIONS), rows that rewrite and format treat exactly as injected ones.

Each sentence of a toxic sample is scored, cut exactly as the decoder's scorer-guided rollback
cuts the text it checks (pipeline.text.sentence_spans: a sentence end or a line break ends one).
When the first offending sentence comes after at least `min_safe_sentences` safe ones, the row's
one violation is that sentence, exactly as the model wrote it, and its rollback point `at` is
the end of the last safe sentence: where that rollback (docs/decoding.md#guard) would crop and
resample. `response` is the safe prefix (the text up to `at`), `injected` the model's text up to the
end of the offending sentence: the prefix, the model's own whitespace after it (a space, or the line
breaks of a list), then the span, as inject writes a span in after its one space; what the model
wrote after that sentence is dropped, since its safety is unknown. rewrite then writes a safe
sentence continuing from `at`, and format builds `bsafe` and `rlbf` rows with the model's own
offending text, and its own whitespace before it, as the harmful span. The span's policy comes
from the scorer label that flagged it (`label_policies`, first listed label at or over the
threshold; else `fallback_policy`). Rows carry `meta.origin` "natural" (inject's say
"injected").

`ratio` is the mixture ratio natural:injected: at most `ratio` × (inject.violations rows) natural
rows are kept, picked by a per-row seed (run seed, row id), so the same run keeps the same rows;
null keeps every one, 0 none.

Rejects a toxic sample with no sentence over the threshold although the whole text was
(`no_offending_sentence`), one whose first offending sentence comes before `min_safe_sentences`
safe ones (`no_safe_prefix`), one whose safe sentences, scored together, reach the threshold
(`unsafe_prefix`: bsafe trains on the prefix), and one over the ratio (`over_ratio`). Turning
samples down is this stage's job, so its rejected-share bound defaults to 1.0.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from pipeline import agreement, judges, records, seeds, taxonomy
from pipeline.scorers import ScorerSpec
from pipeline.stage import StageConfig, StageSpec
from pipeline.text import clean, sentence_spans

SPEC = StageSpec(
    name="natural",
    reads=("filter.toxic", "inject.violations"),
    writes={"violations": records.VIOLATIONS, "judges": records.JUDGES},
)


class Config(StageConfig, judges.RenamedKeys):
    max_rejected_share: float | None = Field(1.0, ge=0, le=1)
    scorer: judges.Judges = ScorerSpec()  # one scorer, or a list of judges
    agree: judges.Agree = "any"  # several judges: a sentence offends when any (all) flag it
    threshold: judges.Threshold = 0.5  # a sentence whose score reaches it offends
    label: str | None = None  # None: the maximum over the scorer's labels
    # natural:injected, in violation rows; null keeps every natural row, 0 none
    ratio: float | None = Field(1.0, ge=0)
    min_safe_sentences: int = Field(1, ge=1)  # a violation at the very start is no rollback
    # Scorer label -> policy; the first label listed whose score reaches the threshold wins, so
    # specific labels come before the general ones (detoxify scores `toxicity` on nearly all).
    label_policies: dict[str, str] = {
        "threat": "violence",
        "identity_attack": "hate",
        "sexual_explicit": "sexual",
        "insult": "harassment",
        "obscene": "harassment",
        "severe_toxicity": "harassment",
        "toxicity": "harassment",
        "profanity": "harassment",
    }
    fallback_policy: str = "harassment"

    @field_validator("label_policies")
    @classmethod
    def _known_policies(cls, mapping: dict[str, str]) -> dict[str, str]:
        for policy in mapping.values():
            _known(policy)
        return mapping

    @field_validator("fallback_policy")
    @classmethod
    def _known_fallback(cls, policy: str) -> str:
        return _known(policy)


def _known(policy: str) -> str:
    known = taxonomy.load().policies
    if policy not in known:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(known)}")
    return policy


def _flag_sentences(
    texts: list[str], cfg: Config, env: Any, votes: agreement.Agreement
) -> list[tuple[bool, dict]]:
    """Does each text (a sentence, or a safe prefix) offend, and every judge's scores
    (pipeline/judges.py); each verdict is counted in `votes`."""
    if not texts:
        return []  # no toxic samples (the usual case at low temperature): no scorer to load
    unique = sorted(set(texts))
    verdicts: dict[str, judges.Judgement] = {}
    with env.progress("natural: scoring sentences", total=len(unique)) as progress:
        for start in range(0, len(unique), 256):
            batch = unique[start : start + 256]
            found = judges.judge(env, cfg.scorer, batch, cfg.agree, cfg.threshold, cfg.label)
            verdicts.update(zip(batch, found, strict=True))
            votes.add(found)
            progress.advance(len(batch))
    return [(verdicts[t].unsafe, verdicts[t].scores) for t in texts]


def _policy(scores: dict[str, float], cfg: Config) -> str:
    """The policy of the first listed label whose score (any judge's: several judges prefix
    their labels `<name>/`) reaches the threshold."""
    best: dict[str, float] = {}
    for label, score in scores.items():
        bare = label.rsplit("/", 1)[-1]
        best[bare] = max(best.get(bare, 0.0), score)
    policies = cfg.label_policies.items()
    hit = (p for lab, p in policies if judges.reaches(best.get(lab, 0.0), cfg.threshold))
    return next(hit, cfg.fallback_policy)


def _violation(
    row: dict[str, Any],
    text: str,
    sents: list[tuple[int, int]],
    flags: list[tuple[bool, dict]],
    cfg: Config,
) -> dict[str, Any] | tuple[str, dict[str, Any]]:
    """The natural violations row for one toxic sample, or a (reason, detail) rejection."""
    first = next((i for i, (offends, _) in enumerate(flags) if offends), None)
    if first is None:
        worst = max((max(s.values(), default=0.0) for _, s in flags), default=0.0)
        return "no_offending_sentence", {"sentences": len(sents), "max_score": worst}
    if first < cfg.min_safe_sentences:
        return "no_safe_prefix", {"first_offending": first, "min_safe": cfg.min_safe_sentences}
    at = sents[first - 1][1]
    # The span starts at its sentence; the whitespace before it is the model's own (kept: the
    # rows format builds show it as the model wrote it, a line break and all).
    start, end = sents[first]
    span = text[start:end]
    response = text[:at]
    policy = _policy(flags[first][1], cfg)
    violation = {
        "at": at,
        "start": start,
        "end": end,
        "span": span,
        "policy": policy,
        "span_source": "natural",
        "span_id": row["id"],
        "license": "",  # the generator's own text, as inject's generator spans
        "scores": records.scores(flags[first][1]),
    }
    meta = dict(row.get("meta") or {})  # the sample's provenance; scores: the prefix's, in run
    meta["origin"] = "natural"
    meta["offsets"] = [{"start": start, "end": end, "policy": policy}]
    return {
        "id": records.row_id("natural", row["id"], at),
        "source": row["source"],
        "source_id": row["source_id"],
        "license": row["license"],
        "response_id": row["id"],
        "prompt": clean(row["prompt"]),
        "response": response,
        "injected": text[:end],
        "policy": [policy],
        "violations": [violation],
        "meta": meta,
    }


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, Any]:
    rows = inputs["filter.toxic"].to_pylist()
    texts = [clean(r["response"]) for r in rows]
    sents = [sentence_spans(t) for t in texts]
    pieces = [t[a:b] for t, ss in zip(texts, sents, strict=True) for a, b in ss]
    votes = agreement.Agreement(judges.rules(cfg.scorer, cfg.threshold, cfg.label))
    flat = _flag_sentences(pieces, cfg, env, votes)
    built, rejected, i = [], [], 0
    for row, text, ss in zip(rows, texts, sents, strict=True):
        found = _violation(row, text, ss, flat[i : i + len(ss)], cfg)
        i += len(ss)
        if isinstance(found, tuple):
            rejected.append(records.reject(row, "natural", *found))
        else:
            built.append((row, found))
    # Safe sentence by sentence is not safe as a whole for every scorer, and bsafe trains on the
    # prefix: it is scored too, and its scores are the row's (what format reports for the
    # response, as inject's rows carry the benign response's).
    candidates = []
    for (row, out), (offends, scores) in zip(
        built, _flag_sentences([b["response"] for _, b in built], cfg, env, votes), strict=True
    ):
        if offends:
            rejected.append(records.reject(row, "natural", "unsafe_prefix", {"scores": scores}))
        else:
            out["meta"]["scores"] = records.scores(scores)
            candidates.append((row, out))

    injected = inputs["inject.violations"].num_rows
    cap = len(candidates) if cfg.ratio is None else int(cfg.ratio * injected)
    # The kept rows are those with the lowest per-row draws: the same run keeps the same rows,
    # whatever order they came in.
    order = sorted(candidates, key=lambda c: seeds.derive(env.seed, c[0]["id"], "natural"))
    keep = {c[0]["id"] for c in order[:cap]}
    out = []
    for row, built in candidates:
        if row["id"] in keep:
            out.append(built)
        else:
            detail = f"natural.ratio {cfg.ratio} × {injected} injected allows {cap} natural rows"
            rejected.append(records.reject(row, "natural", "over_ratio", detail))
    env.log(
        f"natural: {len(out)} violations from {len(rows)} toxic samples "
        f"({len(candidates)} had a safe prefix; {injected} injected violations)"
    )
    return {
        "violations": records.table(out, records.VIOLATIONS),
        "judges": records.table(votes.table_rows(), records.JUDGES),
        "rejected": records.table(rejected, records.REJECTED),
        "stats": {
            "toxic_samples": len(rows),
            "with_safe_prefix": len(candidates),
            **votes.stats(),
        },
    }

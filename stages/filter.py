"""filter: generator samples -> the benign responses later stages build on.

Reads `sample.samples`; writes `responses` (records.SAMPLES, `meta.scores` filled with every
toxicity judge's labels), `toxic` (the same, for the rows whose one drop reason is `toxic`: they
passed every quality check, so stages/natural.py can turn their own offending sentences into
violations) and `judges` (records.JUDGES: how the judges voted). Everything downstream of
`responses` assumes benign, readable, distinct text, so a row is dropped, in this order, when
it is:

- `non_printable`: control/unassigned characters (or U+FFFD) over `max_non_printable_share`;
- `too_short` / `too_long`: fewer than `min_words` or more than `max_words` words;
- `unfinished`: the generator hit max_new_tokens (`finish_reason` "length"): the text stops mid-way;
- `repetitive`: the share of repeated word n-grams over `max_repeated_ngram_share` (degenerate
  loops, common at high temperature and in small base models);
- `toxic`: the judges call it unsafe (pipeline/judges.py): one scorer's score
  (`label`, else the maximum over labels) reaches `threshold`, or with a list of scorers each
  one's verdict, combined by `agree` (`any`: one flag is enough; `all`: every judge must flag);
- `duplicate`: the same normalised text (case, punctuation, spacing ignored) as an earlier kept row;
- `near_duplicate`: MinHash/LSH Jaccard estimate over word shingles >= `near_duplicate_threshold`
  against an earlier row that passed every check above (pipeline/dedup.py, as blend does).

First, with `trim_to_sentence`, a finished response that does not end a sentence is cut after
its last complete sentence: small base models often leave a stray word where their turn should
end (the embedded Gemma 3 270M nearly always does), and BSAFE builds on whole sentences. The cut
is counted in the log. A response with no complete sentence is left whole for the checks below.

Every dropped row lands in `rejected` with its reason and its scores (the `toxic` ones too, so the
counts say what filter dropped; `natural` reuses them). Dropping is this stage's
job, so its rejected-share bound defaults to 1.0.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import agreement, dedup, judges, records
from pipeline.scorers import ScorerSpec
from pipeline.stage import StageConfig, StageSpec
from pipeline.text import ends_sentence, sentence_ends

SPEC = StageSpec(
    name="filter",
    reads=("sample.samples",),
    writes={"responses": records.SAMPLES, "toxic": records.SAMPLES, "judges": records.JUDGES},
    required=("sample.samples",),
)


class Config(StageConfig, judges.RenamedKeys):
    max_rejected_share: float | None = Field(1.0, ge=0, le=1)
    scorer: judges.Judges = ScorerSpec()  # one scorer, or a list of judges
    agree: judges.Agree = "any"  # several judges: toxic when any (all) of them flags it
    threshold: judges.Threshold = 0.5  # a text whose score reaches it is toxic
    label: str | None = None  # None: the maximum over the scorer's labels
    min_words: int = Field(20, ge=0)
    max_words: int = Field(1000, gt=0)
    drop_unfinished: bool = True
    trim_to_sentence: bool = True  # cut a stray tail after the last complete sentence
    repetition_ngram: int = Field(3, gt=0)
    max_repeated_ngram_share: float = Field(0.3, ge=0, le=1)
    max_non_printable_share: float = Field(0.01, ge=0, le=1)
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)
    shingle_words: int = Field(5, ge=1)
    # LSH bands of 4 values each: pairs from a Jaccard of ~0.42 up become candidates, each then
    # checked on the full signature against the threshold.
    minhash_permutations: int = Field(128, ge=4, multiple_of=4)

    @model_validator(mode="after")
    def _word_bounds(self) -> Config:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self


_WORD = re.compile(r"\w+", re.UNICODE)


def trim_to_sentence(text: str) -> str:
    """`text` cut after its last complete sentence, when it ends mid-sentence and has one."""
    if ends_sentence(text):
        return text
    ends = sentence_ends(text)
    return text[: ends[-1]] if ends else text


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def repeated_ngram_share(words: list[str], n: int) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def non_printable_share(text: str) -> float:
    if not text:
        return 0.0
    bad = sum(
        1
        for ch in text
        if ch == "\ufffd"
        or (unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cn", "Cs") and ch not in "\n\t")
    )
    return bad / len(text)


def _quality(row: dict, words: list[str], cfg: Config) -> tuple[str, dict[str, Any]] | None:
    """The first quality reason that drops this row, with its measurement; None if it passes."""
    share = non_printable_share(row["response"] or "")
    if share > cfg.max_non_printable_share:
        return "non_printable", {"non_printable_share": round(share, 4)}
    if len(words) < cfg.min_words:
        return "too_short", {"words": len(words), "min_words": cfg.min_words}
    if len(words) > cfg.max_words:
        return "too_long", {"words": len(words), "max_words": cfg.max_words}
    if cfg.drop_unfinished and row["finish_reason"] == "length":
        return "unfinished", {
            "finish_reason": "length",
            "completion_tokens": row["completion_tokens"],
        }
    repeated = repeated_ngram_share(words, cfg.repetition_ngram)
    if repeated > cfg.max_repeated_ngram_share:
        return "repetitive", {"repeated_ngram_share": round(repeated, 4)}
    return None


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, pa.Table]:
    rows = inputs["sample.samples"].to_pylist()
    if cfg.trim_to_sentence:
        trimmed = 0
        for row in rows:
            if row["finish_reason"] == "stop" and row["response"]:
                cut = trim_to_sentence(row["response"])
                trimmed += cut != row["response"]
                row["response"] = cut
        env.log(f"filter: cut a stray tail after the last sentence of {trimmed} response(s)")
    verdicts: list[judges.Judgement] = []
    with env.progress("filter: scoring", total=len(rows)) as progress:
        for start in range(0, len(rows), 256):
            batch = [r["response"] or "" for r in rows[start : start + 256]]
            verdicts += judges.judge(env, cfg.scorer, batch, cfg.agree, cfg.threshold, cfg.label)
            progress.advance(len(batch))
    votes = agreement.Agreement(judges.rules(cfg.scorer, cfg.threshold, cfg.label))
    votes.add(verdicts)

    # Each row's fate in input order: (row, scores, None) if kept so far, else a drop reason.
    fates: list[tuple[dict, dict, tuple[str, dict[str, Any]] | None]] = []
    seen: dict[str, str] = {}  # normalised-text hash -> id of the first row with that text
    for row, verdict in zip(rows, verdicts, strict=True):
        scores = verdict.scores
        words = _words(row["response"] or "")
        key = hashlib.sha256(" ".join(words).encode()).hexdigest()
        if found := _quality(row, words, cfg):
            fates.append((row, scores, found))
        elif verdict.unsafe:
            fates.append((row, scores, ("toxic", verdict.detail(cfg.agree))))
        elif key in seen:
            fates.append((row, scores, ("duplicate", {"duplicate_of": seen[key]})))
        else:
            seen[key] = row["id"]
            fates.append((row, scores, None))
    # Near duplicates among the rows still kept, an earlier row winning.
    alive = [i for i, (_, _, fate) in enumerate(fates) if fate is None]
    texts = pa.array([fates[i][0]["response"] or "" for i in alive], pa.string())
    sig = dedup.signatures([texts], len(texts), cfg.shingle_words, cfg.minhash_permutations)
    bands = cfg.minhash_permutations // 4
    one_group = np.zeros(len(alive), dtype=np.uint64)
    dup, match, score = dedup.near_duplicates(sig, one_group, cfg.near_duplicate_threshold, bands)
    for a in np.flatnonzero(dup):
        row, scores, _ = fates[alive[a]]
        other = fates[alive[match[a]]][0]["id"]
        near = {"duplicate_of": other, "jaccard": round(float(score[a]), 4)}
        fates[alive[a]] = (row, scores, ("near_duplicate", near))

    kept, toxic, rejected = [], [], []
    for row, scores, fate in fates:
        scored = {**row, "meta": {**(row["meta"] or {}), "scores": records.scores(scores)}}
        if fate is None:
            kept.append(scored)
        else:
            if fate[0] == "toxic":  # still rejected here: filter's counts stay what it dropped
                toxic.append(scored)
            reason, detail = fate
            detail = {**detail, "scores": scores}
            rejected.append(records.reject(row, "filter", reason, json.dumps(detail)))
    return {
        "responses": records.table(kept, records.SAMPLES),
        "toxic": records.table(toxic, records.SAMPLES),
        "judges": records.table(votes.table_rows(), records.JUDGES),
        "rejected": records.table(rejected, records.REJECTED),
        "stats": votes.stats(),
    }

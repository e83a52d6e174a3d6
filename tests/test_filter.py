"""The filter stage: one golden row per drop reason, kept rows carry scores, dedup keeps firsts.

Texts are written here; scores come from the real profanity-check model (offline, shipped in its
wheel).
"""

from __future__ import annotations

import json

import pytest

import stages.filter as filt
from pipeline import records
from pipeline.env import LocalEnv

GOOD = (
    "Start with a few simple dishes you already like, such as pasta or an omelette. Learn how to "
    "hold a knife and how to tell when oil is hot. Cook each recipe a few times until it is easy."
)
OTHER = (
    "Most houseplants do well with bright, indirect light and soil that dries between waterings. "
    "Check the soil with a finger and water only when it feels dry, and wipe dust off the leaves."
)


def row(id_, response, finish="stop"):
    return {
        "id": id_,
        "source": "test",
        "source_id": id_,
        "license": "CC0-1.0",
        "prompt_id": f"p-{id_}",
        "prompt": "Tell me something useful.",
        "response": response,
        "sample_index": 0,
        "finish_reason": finish,
        "prompt_tokens": 10,
        "completion_tokens": 40,
        "meta": {"generator": "stand-in", "backend": "transformers", "seed": 1},
    }


def run_filter(rows, **cfg):
    table = records.table(rows, records.SAMPLES)
    return filt.run({"sample.samples": table}, filt.Config(**cfg), LocalEnv())


def test_each_drop_has_its_reason_and_scores():
    rows = [
        row("good", GOOD),
        row("other", OTHER),
        row("control", GOOD.replace("pasta", "pasta\x00\x01\x02\x03\x04")),
        row("short", "Yes, that works."),
        row("long", " ".join(["word"] * 150)),
        row("cut", OTHER.replace("Check", "Then check"), finish="length"),
        row("loop", "She loved to play with her dolls. " * 6),
        row("toxic", GOOD + " You are a fucking idiot and a worthless piece of shit."),
        row("dup", GOOD.upper().replace(",", "")),  # same words, other case and punctuation
        row("near", GOOD.replace("until it is easy.", "until it feels easy.")),
    ]
    out = run_filter(rows, max_words=100)
    reasons = {r["id"]: r["reason"] for r in out["rejected"].to_pylist()}
    assert reasons == {
        "control": "non_printable",
        "short": "too_short",
        "long": "too_long",
        "cut": "unfinished",
        "loop": "repetitive",
        "toxic": "toxic",
        "dup": "duplicate",
        "near": "near_duplicate",
    }
    kept = out["responses"].to_pylist()
    assert [r["id"] for r in kept] == ["good", "other"]
    assert kept[0]["response"] == GOOD and kept[0]["meta"]["generator"] == "stand-in"
    assert [s["label"] for s in kept[0]["meta"]["scores"]] == ["profanity"]
    details = {r["id"]: json.loads(r["detail"]) for r in out["rejected"].to_pylist()}
    assert all("profanity" in d["scores"] for d in details.values())
    assert details["toxic"]["toxicity"] >= 0.5
    assert details["dup"]["duplicate_of"] == details["near"]["duplicate_of"] == "good"
    assert 0.8 <= details["near"]["jaccard"] < 1
    assert json.loads(out["rejected"].to_pylist()[0]["row"])["id"] == "control"
    assert out["responses"].schema == records.SAMPLES


def test_unfinished_rows_can_be_kept_and_bounds_are_configurable():
    rows = [row("cut", GOOD, finish="length"), row("short", "A short but fine answer.")]
    out = run_filter(rows, drop_unfinished=False, min_words=3)
    assert out["responses"].column("id").to_pylist() == ["cut", "short"]


def test_dropping_is_the_job_so_any_share_may_be_rejected():
    assert filt.Config().max_rejected_share == 1.0
    out = run_filter([row("empty", ""), row("none", None)])
    assert [r["reason"] for r in out["rejected"].to_pylist()] == ["too_short", "too_short"]


@pytest.mark.parametrize(
    "text,share",
    [("a b c d", 0.0), ("a b c a b c", 1 / 4), ("x y z " * 10, 25 / 28)],
)
def test_repeated_ngram_share(text, share):
    assert filt.repeated_ngram_share(text.split(), 3) == pytest.approx(share)


def test_non_printable_share_ignores_newlines_and_tabs():
    assert filt.non_printable_share("a\nb\tc") == 0
    assert filt.non_printable_share("ab\x00\ufffd") == 0.5


def test_stray_tail_after_the_last_sentence_is_cut_only_when_finished():
    rows = [
        row("tail", OTHER + " législ"),  # a base model's stray word where its turn should end
        row("whole", GOOD),
        row("no_sentence", "a run of words with no sentence end at all and then some more words"),
    ]
    out = run_filter(rows, min_words=5)["responses"].to_pylist()
    by_id = {r["id"]: r["response"] for r in out}
    assert by_id == {"tail": OTHER, "whole": GOOD, "no_sentence": rows[2]["response"]}
    assert (
        run_filter(rows[:1], min_words=5, trim_to_sentence=False)["responses"]
        .to_pylist()[0]["response"]
        .endswith("législ")
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("near_duplicate_threshold", 0.0),
        ("near_duplicate_threshold", 1.5),
        ("minhash_permutations", 130),
    ],
)
def test_near_duplicate_settings_are_checked_naming_the_key(key, value):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match=key):
        filt.Config(**{key: value})

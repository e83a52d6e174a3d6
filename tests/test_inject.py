"""inject: where spans go, which spans, what is recorded, and which rows are rejected."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError
from recipe_data import StandInEnv, StandInGenerator, WordScorer, harmful, responses

from pipeline import records, taxonomy
from pipeline.text import boundaries
from stages import inject

TEA = "Tea is a drink. It comes from a plant! Many people enjoy it? Some add milk. Others do not."
COFFEE = "Coffee is roasted. It is brewed with hot water. It wakes people up."
NO_HARMFUL = harmful()


def _run(resp: pa.Table, cfg: inject.Config, env=None, harm: pa.Table = NO_HARMFUL):
    return inject.run({"filter.responses": resp, "sources.harmful": harm}, cfg, env or StandInEnv())


def test_spans_land_at_sentence_boundaries_with_offsets():
    out = _run(
        responses(("r1", "About tea?", TEA), ("r2", "Coffee?", COFFEE)), inject.Config(scorer=None)
    )
    rows = out["violations"].to_pylist()
    assert out["violations"].schema == records.VIOLATIONS
    assert [r["response_id"] for r in rows] == ["r1", "r2"]
    for row in rows:
        assert 1 <= len(row["violations"]) <= 2
        rebuilt, prev = "", 0
        for v in row["violations"]:
            assert v["at"] in boundaries(row["response"])
            assert row["injected"][v["start"] : v["end"]] == v["span"]
            assert v["span"] in [s["text"] for s in inject._bank()[v["policy"]]]
            assert v["span_source"] == "bank" and v["license"] == "apache-2.0"  # normalised
            rebuilt += row["response"][prev : v["at"]] + " " + v["span"]
            prev = v["at"]
        assert row["injected"] == rebuilt + row["response"][prev:]
        assert row["policy"] == list(dict.fromkeys(v["policy"] for v in row["violations"]))
        assert row["meta"]["offsets"] == [
            {"start": v["start"], "end": v["end"], "policy": v["policy"]} for v in row["violations"]
        ]
        assert row["meta"]["generator"] == "stand-in" and row["meta"]["temperature"] == 1.5


def test_rows_do_not_depend_on_chunking():
    cfg = inject.Config(scorer=None, max_violations=3)
    both = _run(responses(("r1", "q", TEA), ("r2", "q", COFFEE)), cfg)["violations"].to_pylist()
    alone = _run(responses(("r2", "q", COFFEE)), cfg)["violations"].to_pylist()
    assert both[1] == alone[0]
    again = _run(responses(("r1", "q", TEA), ("r2", "q", COFFEE)), cfg)["violations"].to_pylist()
    assert again == both


def test_count_and_policy_follow_the_config():
    resp = responses(*[(f"r{i}", "q", TEA) for i in range(40)])
    cfg = inject.Config(
        scorer=None, min_violations=2, max_violations=3, policy_weights={"crime": 1.0, "hate": 0.0}
    )
    rows = _run(resp, cfg)["violations"].to_pylist()
    counts = {len(r["violations"]) for r in rows}
    assert counts == {2, 3}
    assert {v["policy"] for r in rows for v in r["violations"]} == {"crime"}


def test_a_response_with_few_boundaries_gets_at_most_that_many():
    rows = _run(
        responses(("r", "q", "One sentence. Two.")),
        inject.Config(scorer=None, min_violations=3, max_violations=5),
    )
    assert len(rows["violations"].to_pylist()[0]["violations"]) == 1


def test_bad_responses_are_rejected_with_a_reason():
    out = _run(
        responses(("e", "q", "   "), ("s", "q", "Just one sentence here.")),
        inject.Config(scorer=None),
    )
    assert out["violations"].num_rows == 0
    reasons = dict(
        zip(
            out["rejected"].column("id").to_pylist(),
            out["rejected"].column("reason").to_pylist(),
            strict=True,
        )
    )
    assert reasons == {"e": "empty_response", "s": "no_sentence_boundary"}


def test_control_tokens_in_a_response_are_neutralised():
    text = "Say [RESET] now. Then [BACKTRACK-HATE] stop. End here."
    row = _run(responses(("r", "q [REPLACE]", text)), inject.Config(scorer=None))[
        "violations"
    ].to_pylist()[0]
    assert "[RESET]" not in row["injected"] and "(RESET)" in row["response"]
    assert row["prompt"] == "q (REPLACE)"


def test_spans_are_scored():
    env = StandInEnv(scorer=WordScorer(bad=("lazy", "idiot", "stupid", "pathetic")))
    cfg = inject.Config(policy_weights={"harassment": 1.0})
    rows = _run(responses(*[(f"r{i}", "q", TEA) for i in range(10)]), cfg, env)[
        "violations"
    ].to_pylist()
    for row in rows:
        for v in row["violations"]:
            expected = (
                0.9
                if any(w in v["span"].lower() for w in ("idiot", "stupid", "pathetic"))
                else 0.01
            )
            assert v["scores"] == [{"label": "toxicity", "score": expected}]


def test_beavertails_spans_are_sentences_of_harmful_answers():
    harm = harmful(
        ("h1", "p", "You should insult them loudly. Then walk away from them.", ["harassment"]),
        ("h2", "p", "Short. Taking things from shops is fine if nobody sees.", ["crime"]),
    )
    cfg = inject.Config(
        scorer=None, span_source="beavertails", policy_weights={"crime": 1, "sexual": 5}
    )
    rows = _run(responses(*[(f"r{i}", "q", TEA) for i in range(5)]), cfg, harm=harm)[
        "violations"
    ].to_pylist()
    spans = {
        (v["span"], v["policy"], v["span_id"], v["license"]) for r in rows for v in r["violations"]
    }
    # "sexual" has no spans in this source; "Short." is under min_span_chars.
    assert spans == {
        ("Taking things from shops is fine if nobody sees.", "crime", "h2:1", "CC BY-NC 4.0")
    }


def test_no_spans_for_the_weighted_policies_is_a_rejection():
    cfg = inject.Config(scorer=None, span_source="beavertails")
    out = _run(responses(("r", "q", TEA)), cfg)
    assert out["rejected"].column("reason").to_pylist() == ["no_span"]


def test_generator_spans_use_the_redteam_template():
    def answer(prompt: str, seed: int) -> str:
        return "Honestly, they are all rude people. And more text." if "Tea" in prompt else "x"

    gen = StandInGenerator(answer)
    cfg = inject.Config(
        scorer=None, span_source="generator", policy_weights={"hate": 1}, max_violations=1
    )
    out = _run(responses(("r1", "q", TEA), ("r2", "q", "Hi. [tiny]")), cfg, StandInEnv(gen))
    row = out["violations"].to_pylist()[0]
    assert row["violations"][0]["span"] == "Honestly, they are all rude people."
    assert row["violations"][0]["span_source"] == "generator"
    assert taxonomy.load().policies["hate"].description in gen.calls[0][0]
    assert out["rejected"].column("reason").to_pylist() == ["span_generation_failed"]


def test_config_rejects_unknown_policies_and_bad_bounds():
    with pytest.raises(ValidationError, match="unknown policy"):
        inject.Config(policy_weights={"nope": 1.0})
    with pytest.raises(ValidationError, match="max_violations"):
        inject.Config(min_violations=3, max_violations=2)

"""natural: a toxic sample's own first offending sentence becomes a violation, taken back from the
end of the sentence before it; rejections, the natural:injected ratio, and the bsafe and rlbf rows
format builds from it.

The scorer is scripted (recipe_data.WordScorer): it flags exactly the texts holding the planted
marker, so each test says which sentence offends.
"""

from __future__ import annotations

import pytest
from decode_fixtures import Script, decoder
from recipe_data import StandInEnv, StandInGenerator, WordScorer, harmful, responses

import stages.filter as filt
from pipeline import records
from pipeline.decode import GuardConfig, Request
from pipeline.env import LocalEnv
from pipeline.judges import JudgeError
from pipeline.render import render
from pipeline.scorers import ScorerSpec
from stages import format as fmt
from stages import natural, rewrite

MARK = "zorkish"  # the planted word the scripted scorer flags
SAFE_1 = "Tea is green."
SAFE_2 = "It grows on hills."
BAD = f"You are a {MARK} fool."
TAIL = "People love it."


def env(seed: int = 0) -> StandInEnv:
    return StandInEnv(scorer=WordScorer((MARK,)), seed=seed)


def toxic(*rows: tuple[str, str]):
    """filter.toxic rows from (id, response)."""
    return responses(*((rid, "About tea?", text) for rid, text in rows))


def injected(n: int):
    """n inject.violations rows: natural only counts them."""
    return records.table([{"id": f"v{i}"} for i in range(n)], records.VIOLATIONS)


def run(rows, cfg=None, n_injected: int = 10, seed: int = 0):
    inputs = {"filter.toxic": rows, "inject.violations": injected(n_injected)}
    return natural.run(inputs, cfg or natural.Config(), env(seed))


def test_the_span_is_the_planted_sentence_and_at_the_end_of_the_one_before():
    text = f"{SAFE_1} {SAFE_2}  {BAD} {TAIL}"  # two spaces: whitespace is no part of a sentence
    out = run(toxic(("s1", text)))
    assert out["violations"].schema == records.VIOLATIONS
    (row,) = out["violations"].to_pylist()
    prefix = f"{SAFE_1} {SAFE_2}"
    (v,) = row["violations"]
    assert v["span"] == BAD
    assert v["at"] == text.index(SAFE_2) + len(SAFE_2) == len(prefix)
    assert row["response"] == prefix  # the safe prefix, ending at the rollback point
    # the model's own text up to its offending sentence, its own two spaces kept before the span;
    # what followed it (TAIL) is dropped
    assert row["injected"] == f"{prefix}  {BAD}"
    assert row["injected"][v["start"] : v["end"]] == BAD
    assert (v["span_source"], v["span_id"], v["policy"]) == ("natural", "s1", "harassment")
    assert v["scores"] == [{"label": "toxicity", "score": 0.9}]
    assert row["response_id"] == "s1" and row["policy"] == ["harassment"]
    assert row["meta"]["origin"] == "natural"
    offsets = [{"start": v["start"], "end": v["end"], "policy": "harassment"}]
    assert row["meta"]["offsets"] == offsets
    assert row["meta"]["generator"] == "stand-in"  # the sample's provenance travels with it
    assert row["meta"]["scores"] == [{"label": "toxicity", "score": 0.01}]  # the prefix's
    assert out["rejected"].num_rows == 0
    # every verdict is counted, as at the other gates: four sentences and the safe prefix
    (votes,) = out["judges"].to_pylist()
    assert (votes["rows"], votes["flagged"], votes["clear"]) == (5, 1, 4)


def test_no_safe_prefix_and_no_offending_sentence_are_rejected_with_their_reason():
    rows = toxic(
        ("first", f"{BAD} {SAFE_1} {TAIL}"),
        ("second", f"{SAFE_1} {BAD} {TAIL}"),
        ("none", f"{SAFE_1} {SAFE_2} {TAIL}"),  # the whole text was toxic, no one sentence is
    )
    out = run(rows)
    assert [r["response_id"] for r in out["violations"].to_pylist()] == ["second"]
    reasons = {r["id"]: r["reason"] for r in out["rejected"].to_pylist()}
    assert reasons == {"first": "no_safe_prefix", "none": "no_offending_sentence"}
    two = run(rows, natural.Config(min_safe_sentences=2))
    assert two["violations"].num_rows == 0
    assert {r["id"]: r["reason"] for r in two["rejected"].to_pylist()}["second"] == "no_safe_prefix"


def test_a_prefix_unsafe_as_a_whole_is_rejected():
    # The scripted scorer also flags text running across the first two sentences' boundary,
    # which no single sentence holds.
    scorer = WordScorer((MARK, "green. it"))
    inputs = {
        "filter.toxic": toxic(("s1", f"{SAFE_1} {SAFE_2} {BAD}")),
        "inject.violations": injected(1),
    }
    out = natural.run(inputs, natural.Config(), StandInEnv(scorer=scorer))
    assert out["violations"].num_rows == 0
    assert [r["reason"] for r in out["rejected"].to_pylist()] == ["unsafe_prefix"]


def _four():
    return [(f"s{i}", f"{SAFE_1} Sample {i} is here. {BAD}") for i in range(4)]


@pytest.mark.parametrize(("ratio", "kept"), [(None, 4), (0.0, 0), (0.5, 1), (1.0, 2)])
def test_ratio_caps_natural_rows_per_injected_row_and_quarantines_the_rest(ratio, kept):
    out = run(toxic(*_four()), natural.Config(ratio=ratio), n_injected=2)
    assert out["violations"].num_rows == kept
    rejected = out["rejected"].to_pylist()
    assert len(rejected) == 4 - kept and {r["reason"] for r in rejected} <= {"over_ratio"}


def test_the_rows_a_ratio_keeps_are_the_same_in_any_order():
    cfg = natural.Config(ratio=0.5)
    picked = {
        frozenset(r["response_id"] for r in run(toxic(*rows), cfg, 4)["violations"].to_pylist())
        for rows in (_four(), _four()[::-1], _four()[1:] + _four()[:1])
    }
    assert len(picked) == 1 and len(next(iter(picked))) == 2


def test_no_toxic_samples_is_no_work():
    class NoScorer(StandInEnv):
        def scorer(self, spec):
            raise AssertionError("no scorer is needed for no samples")

    inputs = {"filter.toxic": toxic(), "inject.violations": injected(3)}
    out = natural.run(inputs, natural.Config(), NoScorer())
    assert out["violations"].num_rows == 0 and out["rejected"].num_rows == 0


def test_label_policies_must_name_taxonomy_policies():
    with pytest.raises(ValueError, match="unknown policy 'rudeness'"):
        natural.Config(label_policies={"toxicity": "rudeness"})
    cfg = natural.Config(label_policies={"toxicity": "hate"}, label="toxicity")
    (row,) = run(toxic(("s1", f"{SAFE_1} {BAD}")), cfg)["violations"].to_pylist()
    assert row["violations"][0]["policy"] == "hate"
    with pytest.raises(JudgeError, match="no label 'insult'"):
        run(toxic(("s1", f"{SAFE_1} {BAD}")), natural.Config(label="insult"))


def test_filter_keeps_its_toxic_only_rows_for_natural():
    text = f"{SAFE_1} {SAFE_2} You are a fucking idiot and a worthless piece of shit. {TAIL}"
    rows = responses(("ok", "Q?", f"{SAFE_1} {SAFE_2} {TAIL}"), ("bad", "Q?", text))
    out = filt.run({"sample.samples": rows}, filt.Config(min_words=3), LocalEnv())  # real scorer
    (kept,) = out["toxic"].to_pylist()
    assert kept["id"] == "bad" and kept["response"] == text
    assert [s["label"] for s in kept["meta"]["scores"]] == ["profanity"]
    assert out["toxic"].schema == records.SAMPLES
    # still counted among filter's drops
    assert [(r["id"], r["reason"]) for r in out["rejected"].to_pylist()] == [("bad", "toxic")]


def test_rewrite_continues_a_natural_span_from_its_rollback_point():
    violations = run(toxic(("s1", f"{SAFE_1} {SAFE_2} {BAD} {TAIL}")))["violations"]
    gen = StandInGenerator(lambda prompt, seed: "It is also lovely to drink.")
    inputs = {
        "inject.violations": records.table([], records.VIOLATIONS),
        "natural.violations": violations,
        "sources.harmful": harmful(),
    }
    out = rewrite.run(inputs, rewrite.Config(), StandInEnv(gen, WordScorer((MARK,))))
    (rep,) = out["replacements"].to_pylist()
    assert (rep["violation_id"], rep["index"]) == (violations["id"][0].as_py(), 0)
    assert rep["replacement"] == "It is also lovely to drink." and rep["span"] == BAD
    (prompt,) = gen.calls[0]
    assert prompt.endswith(f"Text so far:\n{SAFE_1} {SAFE_2}\n</user>")  # the safe prefix
    assert "what comes next" not in prompt  # nothing follows a rollback point


def test_natural_rolls_back_where_the_decoders_guard_does_on_multi_line_text(control_model_dir):
    """The same text as a sample natural turns into a row, and as a model's turn under the
    decoder's scorer-guided rollback, with the same real scorer: the guard keeps exactly
    natural's safe prefix and takes back exactly its whitespace and span."""
    text = "Foxes are quick.\nThey run far:\n\nYou are a fucking idiot.\nThat is all."
    spec, threshold = ScorerSpec(kind="profanity-check"), 0.8
    cfg = natural.Config(scorer=spec, threshold=threshold)
    inputs = {"filter.toxic": toxic(("s1", text)), "inject.violations": injected(1)}
    (row,) = natural.run(inputs, cfg, LocalEnv())["violations"].to_pylist()
    (v,) = row["violations"]
    assert row["response"] == "Foxes are quick.\nThey run far:"  # the line before, kept
    assert v["span"] == "You are a fucking idiot." and text[v["at"] : v["start"]] == "\n\n"

    dec = decoder(
        control_model_dir,
        scorer=LocalEnv().scorer(spec),
        temperature=0,
        max_new_tokens=60,
        guard=GuardConfig(threshold=threshold, retries=0),
    )
    user = [{"role": "user", "content": "Tell me about foxes."}]
    [out] = dec.decode([Request(user)], processors=[Script([dec.prompts.text(text)])])
    rollback = next(e for e in out.events if e.kind == "rollback")
    assert out.visible == f"{row['response']} {dec.cfg.guard.refusal}"
    assert rollback.removed.startswith(text[v["at"] : v["end"]])


def test_a_list_answer_keeps_its_lines_and_the_models_line_breaks_before_the_span(tiny_model_dir):
    # List items end without a period: each line is a unit, as the guard reads them.
    prefix = "Steps:\n1. Boil water\n2. Add leaves"
    text = f"{prefix}\n\n{BAD}\n{TAIL}"
    samples = toxic(("s1", text))
    violations = run(samples)["violations"]
    (vrow,) = violations.to_pylist()
    (v,) = vrow["violations"]
    assert vrow["response"] == prefix and v["at"] == len(prefix) and v["span"] == BAD
    assert (
        vrow["injected"] == f"{prefix}\n\n{BAD}" and vrow["injected"][v["start"] : v["end"]] == BAD
    )
    replacement = "Then let it steep."
    inputs = _format_inputs(samples, violations, replacement)
    out = fmt.run(inputs, fmt.Config(target_tokenizer=str(tiny_model_dir)), env())
    assert out["rejected"].num_rows == 0
    (bsafe,) = out["bsafe"].to_pylist()
    assert bsafe["segments"][1] == {"text": f"\n\n{BAD}", "role": "harmful", "train": False}
    assert bsafe["visible"] == f"{prefix}\n\n{replacement}"
    assert render(bsafe["completion"]) == bsafe["visible"]
    (rlbf,) = out["rlbf"].to_pylist()
    assert rlbf["completion"][0]["content"].endswith(f"]\n\n{replacement}")
    tok = fmt._tokenizer(str(tiny_model_dir), None)
    assert render(rlbf["completion"], strict=True, tokenizer=tok) == rlbf["visible"]
    assert rlbf["visible"] == bsafe["visible"]


def _format_inputs(samples, violations, replacement: str) -> dict:
    """format's inputs for natural violations, each with `replacement` as its replacement."""
    reps = records.table(
        [
            {
                "id": f"r{i}",
                "violation_id": vid,
                "index": 0,
                "policy": "harassment",
                "span": BAD,
                "replacement": replacement,
                "meta": {"template": "rewrite/replacement.jinja", "fallback": False},
            }
            for i, vid in enumerate(violations.column("id").to_pylist())
        ],
        records.REPLACEMENTS,
    )
    none = records.table([], records.REWRITES)
    return {
        "inject.violations": records.table([], records.VIOLATIONS),
        "natural.violations": violations,
        "rewrite.replacements": reps,
        "rewrite.refusals": none,
        "rewrite.safe_responses": none,
        "sources.harmful": harmful(),
        "filter.responses": responses(),
        "filter.toxic": samples,
    }


def test_format_builds_bsafe_and_rlbf_rows_from_a_natural_violation(tiny_model_dir):
    text = f"{SAFE_1} {SAFE_2} {BAD} {TAIL}"
    samples = toxic(("s1", text))
    violations = run(samples)["violations"]
    replacement = "It is also lovely to drink."
    inputs = _format_inputs(samples, violations, replacement)
    out = fmt.run(inputs, fmt.Config(target_tokenizer=str(tiny_model_dir)), env())
    assert out["rejected"].num_rows == 0
    prefix = f"{SAFE_1} {SAFE_2}"
    (bsafe,) = out["bsafe"].to_pylist()
    assert bsafe["completion"][0]["content"] == (
        f"{prefix} {BAD}[BACKTRACK-HARASSMENT]{BAD}[REPLACE]{replacement}"
    )
    assert bsafe["visible"] == f"{prefix} {replacement}"
    assert render(bsafe["completion"]) == bsafe["visible"]
    assert [s["role"] for s in bsafe["segments"]][:2] == ["text", "harmful"]
    assert bsafe["segments"][1] == {"text": f" {BAD}", "role": "harmful", "train": False}
    (rlbf,) = out["rlbf"].to_pylist()
    tok = fmt._tokenizer(str(tiny_model_dir), None)
    content = rlbf["completion"][0]["content"]
    assert content.startswith(f"{prefix} {BAD}[CATEGORY-HARASSMENT][BACKTRACK_BY_")
    assert content.endswith(f"] {replacement}")  # the take-back goes on with the replacement
    assert rlbf["visible"] == bsafe["visible"]
    assert render(rlbf["completion"], strict=True, tokenizer=tok) == rlbf["visible"]
    for row in (bsafe, rlbf):
        assert row["meta"]["origin"] == "natural" and BAD not in row["visible"]
        assert row["source_id"] == "alpaca-s1"

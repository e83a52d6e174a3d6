"""Properties over random inputs: format → render round-trips (rlbf's take-backs with a real
target tokenizer), and planted control-token strings never survive into a record as control
tokens."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recipe_data import StandInEnv, harmful, responses

from pipeline import records, taxonomy
from pipeline.render import control_tokens, render
from stages import format as fmt
from stages import format_build as build
from stages import inject

TAX = taxonomy.load()
# Pieces a hostile or unlucky source text could hold: every control token, look-alikes, halves
# of tokens that could meet at a join, model special tokens, and ordinary words.
PLANTED = [
    *TAX.all_tokens,
    "[reset]",
    "[ RESET ]",
    "[RES",
    "ET]",
    "[BACKTRACK-",
    "<end_of_turn>",
]
WORDS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8),
    st.sampled_from(["tea", "milk", "café", "😀", "ok", "no"]),
    st.sampled_from(PLANTED),
)
SENTENCE = st.builds(
    lambda words, end: " ".join(words) + end,
    st.lists(WORDS, min_size=1, max_size=6),
    st.sampled_from([".", "!", "?"]),
)
TEXT = st.builds(
    lambda parts, sep: sep.join(parts),
    st.lists(SENTENCE, min_size=1, max_size=6),
    st.sampled_from([" ", "\n", "\n\n"]),
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_sft_rows(table, tokenizer=None):
    for row in table.to_pylist():
        content = row["completion"][0]["content"]
        assert "".join(s["text"] for s in row["segments"]) == content
        assert render(content, strict=True, tokenizer=tokenizer) == row["visible"]
        assert control_tokens(content) == [
            s["text"] for s in row["segments"] if s["role"] == "control"
        ]
        assert all(not control_tokens(s["text"]) for s in row["segments"] if s["role"] != "control")
        assert not control_tokens(row["prompt"][0]["content"])
        assert not build.untrained_space(row["segments"])


def _reasons(out):
    return set(out["rejected"].column("reason").to_pylist())


@SETTINGS
@given(
    benign=st.lists(TEXT, min_size=1, max_size=4),
    answers=st.lists(TEXT, min_size=1, max_size=3),
    replacement=TEXT,
    prompt=SENTENCE,
)
def test_bsafe_and_rlbf_round_trip_and_planted_tokens_never_become_control_tokens(
    tiny_model_dir, benign, answers, replacement, prompt
):
    resp = responses(*[(f"r{i}", prompt, text) for i, text in enumerate(benign)])
    harm = harmful(*[(f"h{i}", prompt, a, ["hate"]) for i, a in enumerate(answers)])
    cfg = inject.Config(scorer=None, span_source="beavertails", min_span_chars=1, max_violations=3)
    violations = inject.run({"filter.responses": resp, "sources.harmful": harm}, cfg, StandInEnv())[
        "violations"
    ]
    reps = records.table(
        [
            {
                "id": f"{v['id']}-{i}",
                "violation_id": v["id"],
                "index": i,
                "policy": "hate",
                "span": "",
                "replacement": replacement,
                "meta": {},
            }
            for v in violations.to_pylist()
            for i in range(len(v["violations"]))
        ],
        records.REPLACEMENTS,
    )
    empty = records.table([], records.REWRITES)
    inputs = {
        "inject.violations": violations,
        "rewrite.replacements": reps,
        "rewrite.refusals": empty,
        "rewrite.safe_responses": empty,
        "sources.harmful": harmful(),
        "filter.responses": resp,
    }
    out = fmt.run(inputs, fmt.Config(target_tokenizer=str(tiny_model_dir)), StandInEnv())
    tokenizer = fmt._tokenizer(str(tiny_model_dir), None)
    _check_sft_rows(out["bsafe"])
    _check_sft_rows(out["rlbf"], tokenizer)
    rejected = out["rejected"].column("reason").to_pylist()
    assert out["bsafe"].num_rows + out["rlbf"].num_rows + len(rejected) == 2 * violations.num_rows
    # the only rows format may refuse here: pieces that meet to spell a token, a span that the
    # benign text (or the replacement) also holds, and for rlbf a span whose first token merges
    # with the text before it (so no whole number of tokens takes back exactly the span), or one
    # of more tokens than rlbf_max_x (byte-level pieces of rare characters add up)
    allowed = {"control_token_in_text", "span_in_visible", "render_mismatch", "span_too_long"}
    assert _reasons(out) <= allowed
    for row in out["bsafe"].to_pylist() + out["rlbf"].to_pylist():
        spans = [s["text"] for s in row["segments"] if s["role"] == "harmful"]
        assert not any(span in row["visible"] for span in spans)
    by_id = {r["id"]: r for r in violations.to_pylist()}
    clean = {r["id"]: taxonomy.neutralise(r["response"])[0] for r in resp.to_pylist()}
    for row in out["rlbf"].to_pylist():
        # RLBF's continuation is the benign text itself: what the user sees is the clean answer
        assert row["visible"] in clean.values()
        harm = [s for s in row["segments"] if s["role"] == "harmful"]
        takes = [s["text"] for s in row["segments"] if s["text"].startswith("[BACKTRACK_BY_")]
        for seg, take in zip(harm, takes, strict=True):
            n = len(tokenizer(seg["text"], add_special_tokens=False)["input_ids"])
            assert take == TAX.backtrack_by(n)
    assert by_id or not out["rlbf"].num_rows


@SETTINGS
@given(h=st.one_of(st.just(""), TEXT), safe=TEXT, refusal=TEXT, prompt=SENTENCE)
def test_reset_recovery_and_preference_round_trip(tiny_model_dir, h, safe, refusal, prompt):
    rewrites = lambda text: records.table(  # noqa: E731
        [{"id": "w", "harmful_id": "h1", "policy": [], "text": text, "meta": {}}], records.REWRITES
    )
    inputs = {
        "inject.violations": records.table([], records.VIOLATIONS),
        "rewrite.replacements": records.table([], records.REPLACEMENTS),
        "rewrite.refusals": rewrites(refusal),
        "rewrite.safe_responses": rewrites(safe),
        "sources.harmful": harmful(("h1", prompt, h, ["hate"])),
        "filter.responses": responses(),
    }
    cfg = fmt.Config(target_tokenizer=str(tiny_model_dir), variants_per_triplet=3)
    out = fmt.run(inputs, cfg, StandInEnv())
    for kind in ("reset", "recovery"):
        _check_sft_rows(out[kind])
    reset = TAX.reset_token
    for row in out["preference"].to_pylist():
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert control_tokens(chosen) in ([], [reset]) and control_tokens(rejected) in ([], [reset])
        assert render(chosen) == taxonomy.neutralise(safe)[0]
    assert _reasons(out) <= {"control_token_in_text"}
    assert (
        out["recovery"].num_rows + sum(r["stage"] == "format" for r in out["rejected"].to_pylist())
        >= 3
    )

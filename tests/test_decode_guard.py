"""Scorer-guided rollback with the real profanity-check scorer on scripted turns: a planted
profane sentence is taken back to the end of the last safe sentence and resampled; retries run
out into the refusal; it works on top of the model's own edits."""

from __future__ import annotations

import pytest
from decode_fixtures import Script, decoder

from pipeline.decode import GuardConfig, Request
from pipeline.scorers import ScorerSpec, load_scorer, sentence_spans

USER = [{"role": "user", "content": "Tell me about foxes."}]
SAFE = "The quick brown fox jumps over the lazy dog."
PLANTED = " You are a fucking idiot."
THRESHOLD = 0.8


@pytest.fixture(scope="module")
def model_dir(control_model_dir):
    return control_model_dir


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(ScorerSpec(kind="profanity-check"))


def guarded(model_dir, scorer, retries=2, **cfg):
    guard = GuardConfig(threshold=THRESHOLD, retries=retries)
    return decoder(model_dir, scorer=scorer, temperature=0, max_new_tokens=60, guard=guard, **cfg)


def no_flagged_sentence(text, scorer):
    sentences = [text[s:e] for s, e in sentence_spans(text)]
    return all(v["profanity"] < THRESHOLD for v in scorer.score(sentences))


def test_planted_sentence_is_rolled_back_and_counted_as_wasted(model_dir, scorer):
    dec = guarded(model_dir, scorer)
    w = dec.prompts.text
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    script = w(SAFE) + w(PLANTED) + w(" The capital of France is Paris.") + [eot]
    [out] = dec.decode([Request(USER)], processors=[Script([script])])
    assert "idiot" not in out.visible and out.visible.startswith(SAFE)
    assert no_flagged_sentence(out.visible, scorer)
    [rollback] = [e for e in out.events if e.kind == "rollback"]
    assert rollback.removed.strip().startswith("You are a fucking idiot.")
    # The planted sentence, plus the token whose leading space showed it was complete.
    assert out.wasted_tokens == len(w(PLANTED)) + 1
    assert PLANTED.strip() in out.raw and out.finish_reason == "stop"


def test_flagged_last_sentence_before_end_of_turn_is_caught(model_dir, scorer):
    dec = guarded(model_dir, scorer)
    w = dec.prompts.text
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    [out] = dec.decode([Request(USER)], processors=[Script([w(SAFE) + w(PLANTED) + [eot]])])
    assert out.visible.startswith(SAFE) and "idiot" not in out.visible
    assert [e.kind for e in out.events][:1] == ["rollback"]


def test_retries_run_out_into_the_refusal(model_dir, scorer):
    dec = guarded(model_dir, scorer, retries=1)
    w = dec.prompts.text
    [out] = dec.decode([Request(USER)], processors=[Script([w(SAFE) + w(PLANTED) * 4])])
    assert out.finish_reason == "refused"
    assert out.visible == SAFE + " " + dec.cfg.guard.refusal
    assert [e.kind for e in out.events] == ["rollback", "rollback", "refusal"]


def test_flagged_prefill_is_taken_back_too(model_dir, scorer):
    dec = guarded(model_dir, scorer)
    [out] = dec.decode([Request(USER, prefill=PLANTED.strip() + " And")])
    assert "idiot" not in out.visible and no_flagged_sentence(out.visible, scorer)


def test_guard_on_top_of_the_models_own_edits(model_dir, scorer):
    for context in ("keep", "drop"):
        dec = guarded(model_dir, scorer, context=context)
        w, c = dec.prompts.text, dec.controls.ids
        eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        script = (
            w(SAFE)
            + w(" It bites.")
            + [c["[BACKTRACK-VIOLENCE]"]]
            + w(" It bites.")
            + [c["[REPLACE]"]]
            + w(" It naps.")
            + w(PLANTED)
            + w(" It is calm.")
            + [eot]
        )
        [out] = dec.decode([Request(USER)], processors=[Script([script])])
        assert out.visible.startswith(SAFE + " It naps.")
        assert "bites" not in out.visible and "idiot" not in out.visible
        assert [e.kind for e in out.events] == ["backtrack", "replace", "rollback"]

"""The decoder on RLBF's format: `[CATEGORY-<P>] [BACKTRACK_BY_<n>]` takes back the last n tokens
the user saw and decoding simply continues (FORMATS.md, RLBF inference), on a scripted tiny model
that carries RLBF's tokens as a model trained on an `rlbf` corpus does."""

from __future__ import annotations

import pytest
from decode_fixtures import Script, control_model, decoder

from pipeline import taxonomy
from pipeline.decode import Request
from pipeline.render import render

USER = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def rlbf_dir(tmp_path_factory):
    return control_model(tmp_path_factory.mktemp("rlbf-gemma"), extra=taxonomy.load().rlbf_tokens)


@pytest.mark.parametrize("context", ["keep", "drop"])
def test_a_take_back_hides_the_span_and_decoding_continues(rlbf_dir, context):
    dec = decoder(rlbf_dir, temperature=0, max_new_tokens=60, context=context)
    tax = taxonomy.load()
    ids = dec.controls.ids
    span = dec.prompts.text(" Kill the dog.")
    taken_back = [ids[tax.category("violence")], ids[tax.backtrack_by(len(span))]]
    after = dec.prompts.text(" It wakes.")
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    script = dec.prompts.text("The fox naps.") + span + taken_back + after + [eot]
    scripted = Script([script])
    [out] = dec.decode([Request(USER, seed=0)], processors=[scripted])
    assert out.visible == "The fox naps. It wakes."
    assert out.visible == render(out.raw, tokenizer=dec.tokenizer)
    assert [(e.kind, e.token, e.policy, e.removed) for e in out.events] == [
        ("category", "[CATEGORY-VIOLENCE]", "violence", ""),
        ("backtrack_by", f"[BACKTRACK_BY_{len(span)}]", "violence", " Kill the dog."),
    ]
    # The span and both control tokens never reached the user.
    assert out.wasted_tokens == len(span) + 2
    prompt_len = len(dec.sequence(0, Request(USER)).context)
    resumed = next(c for _, e, c, _ in scripted.seen if len(e) == len(script) - 1)
    if context == "drop":  # conditioned only on what the user sees
        assert dec.tokenizer.decode(resumed[prompt_len:]) == "The fox naps. It wakes."
    else:  # the take-back stays in context, as the corpus trains
        assert resumed[prompt_len:] == script[:-1]

"""The decoder on RLBF's format: `[CATEGORY-<P>] [BACKTRACK_BY_<n>]` takes back the last n tokens
the user saw and decoding simply continues (docs/formats.md#rlbf, docs/decoding.md#take-back), on a
scripted tiny model that carries RLBF's tokens as a model trained on an `rlbf` corpus does."""

from __future__ import annotations

import pytest
from decode_fixtures import Script, control_model, decoder
from pydantic import ValidationError

from pipeline import taxonomy
from pipeline.decode import DecodeConfig, Request
from pipeline.render import render, token_cut

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


def _take_back_turn(dec, emitted: list[int], n: int) -> list[int]:
    """`The fox naps.`, `emitted`, then `[CATEGORY-VIOLENCE] [BACKTRACK_BY_<n>]`, ` It wakes.`."""
    tax = taxonomy.load()
    ids = dec.controls.ids
    take_back = [ids[tax.category("violence")], ids[tax.backtrack_by(n)]]
    eot = dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    return (
        dec.prompts.text("The fox naps.")
        + emitted
        + take_back
        + dec.prompts.text(" It wakes.")
        + [eot]
    )


@pytest.mark.parametrize("span", [" Type <end_of_turn> now.", " Press [RESET] now."])
@pytest.mark.parametrize("where", ["emitted", "prefill"])
def test_a_take_back_over_a_special_token_string_removes_exactly_the_span(rlbf_dir, span, where):
    # The model wrote the span's "<end_of_turn>" / "[RESET]" as ordinary tokens (the trainer's
    # rule), so n counts them as such: the take-back removes the span, not the text before it.
    dec = decoder(rlbf_dir, temperature=0, max_new_tokens=80)
    emitted = dec.prompts.text(span)
    assert len(emitted) > len(dec.tokenizer(span, add_special_tokens=False)["input_ids"])
    if where == "emitted":
        request, script = Request(USER), _take_back_turn(dec, emitted, len(emitted))
    else:  # the span is part of the prefill the turn starts with
        request = Request(USER, prefill="The fox naps." + span)
        script = _take_back_turn(dec, emitted, len(emitted))[
            len(dec.prompts.text("The fox naps.")) + len(emitted) :
        ]
    [out] = dec.decode([request], processors=[Script([script])])
    assert out.visible == "The fox naps. It wakes."
    assert [e.removed for e in out.events if e.kind == "backtrack_by"] == [span]


@pytest.mark.parametrize("reading", ["canonical", "emitted"])
def test_backtrack_by_counts_canonical_or_emitted_tokens(rlbf_dir, reading):
    # A span sampled one character per token: 14 emitted tokens, fewer canonical ones. Each
    # reading's n removes exactly the span; the other reading's n removes another amount.
    span = " Kill the dog."
    probe = decoder(rlbf_dir, temperature=0)
    chars = [t for c in span for t in probe.prompts.text(c)]
    assert len(chars) == len(span)
    canonical = len(probe.prompts.text(span))
    assert canonical < len(span)
    dec = decoder(rlbf_dir, temperature=0, max_new_tokens=80, backtrack_by=reading)
    right, other = (canonical, len(span)) if reading == "canonical" else (len(span), canonical)
    [out] = dec.decode([Request(USER)], processors=[Script([_take_back_turn(dec, chars, right)])])
    assert out.visible == "The fox naps. It wakes."
    [out] = dec.decode([Request(USER)], processors=[Script([_take_back_turn(dec, chars, other)])])
    shown = "The fox naps." + span
    if reading == "emitted":  # the last `canonical` characters
        assert out.visible == shown[: len(shown) - canonical] + " It wakes."
    else:  # `len(span)` canonical tokens reach into the benign sentence
        assert out.visible == shown[: token_cut(dec.tokenizer, shown, other)] + " It wakes."
        assert len(out.visible) < len("The fox naps. It wakes.")
    [event] = [e for e in out.events if e.kind == "backtrack_by"]
    assert event.detail == reading


def test_backtrack_by_reading_is_validated():
    with pytest.raises(ValidationError, match="backtrack_by"):
        DecodeConfig(backtrack_by="last")

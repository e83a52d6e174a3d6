"""A decoded turn describes itself: `record.rerender` recomputes its visible text from the row
alone (prefill, raw, offsets, events), for every kind of turn the decoder makes, including turns
whose text spells control strings in ordinary tokens, which the old lossy reading of `raw` (a
regex over plain text) could not tell from real ones."""

from __future__ import annotations

import json

import pytest
from decode_fixtures import Script, control_model, decoder

from pipeline import taxonomy
from pipeline.decode import GuardConfig, Request
from pipeline.decode.record import controls, plain, rerender
from pipeline.render import render
from pipeline.scorers import ScorerSpec, load_scorer

USER = [{"role": "user", "content": "Tell me about foxes."}]
SAFE = "The quick brown fox jumps over the lazy dog."
PLANTED = " You are a fucking idiot."
SPELLED = " [RESET] I said [BACKTRACK-HATE] no [REPLACE] yes."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    extra = (*taxonomy.load().rlbf_tokens, "[BACKTRACK-PRIVACY_VIOLATION]")
    return control_model(tmp_path_factory.mktemp("record-gemma"), sliding_window=64, extra=extra)


@pytest.fixture(scope="module")
def scorer():
    return load_scorer(ScorerSpec(kind="profanity-check"))


def _turn(dec, *pieces) -> list[int]:
    """Text pieces as ordinary tokens, `[...]` pieces as the real control ids, `list`s as-is."""
    ids: list[int] = []
    for p in pieces:
        if isinstance(p, list):
            ids += p
        elif p in dec.controls.ids:
            ids.append(dec.controls.ids[p])
        else:
            ids += dec.prompts.text(p)
    return ids


def _by(dec, n: int) -> list[int]:
    tax = taxonomy.load()
    return [dec.controls.ids[tax.category("violence")], dec.controls.ids[tax.backtrack_by(n)]]


EOT = "<end_of_turn>"


def _scenarios(dec_of, scorer):
    """(name, decoder, request, script) for each kind of turn."""
    d = dec_of()
    t = d.prompts.text
    eot = [d.tokenizer.convert_tokens_to_ids(EOT)]
    chars = [i for c in " Kill the dog." for i in t(c)]
    guard = GuardConfig(threshold=0.8, retries=1)
    yield "plain", d, Request(USER), _turn(d, "The fox naps.", eot)
    yield "spelled", d, Request(USER, prefill="Sure. [RESET]"), _turn(d, SPELLED, eot)
    yield "id prefill", d, Request(USER, prefill=tuple(t("The fox"))), _turn(d, " naps.", eot)
    yield (
        "bsafe edit",
        d,
        Request(USER),
        _turn(d, "The fox bites.", "[BACKTRACK-VIOLENCE]", " bites.", "[REPLACE]", " naps.", eot),
    )
    yield "own policy", d, Request(USER), _turn(
        d, "At 22 Birch Lane.", "[BACKTRACK-PRIVACY_VIOLATION]", " 22 Birch Lane.", "[REPLACE]",
        " Elsewhere.", SPELLED, eot,
    )  # fmt: skip
    yield "reset", d, Request(USER), _turn(d, "Sure, here", "[RESET]", "No.", eot)
    yield (
        "unclosed",
        d,
        Request(USER),
        _turn(d, "The fox bites.", "[BACKTRACK-HATE]", " bites.", eot),
    )
    yield (
        "rlbf",
        d,
        Request(USER),
        _turn(
            d,
            "The fox naps.",
            " Kill the dog.",
            _by(d, len(t(" Kill the dog."))),
            " It wakes.",
            eot,
        ),
    )
    span = " Press [RESET] now."
    yield (
        "rlbf prefill",
        d,
        Request(USER, prefill="The fox naps." + span),
        _turn(d, _by(d, len(t(span))), " It wakes.", eot),
    )
    e = dec_of(backtrack_by="emitted")
    yield (
        "rlbf emitted",
        e,
        Request(USER, prefill="The fox"),
        _turn(e, " naps.", chars, _by(e, 5), " It wakes.", eot),
    )
    yield (
        "rlbf emitted into prefill",
        e,
        Request(USER, prefill="The fox naps."),
        _turn(e, chars, _by(e, 16), " It wakes.", eot),
    )
    b = dec_of(max_edits=2)
    yield "edit budget", b, Request(USER), _turn(b, "The fox", *["[BACKTRACK]"] * 5)
    s = dec_of(stop=("\n",))
    yield "stop string", s, Request(USER), _turn(s, "The fox naps.", "\nMore", eot)
    k = dec_of(context="drop")
    yield (
        "drop",
        k,
        Request(USER),
        _turn(k, "The fox bites.", "[BACKTRACK-HATE]", " bites.", "[REPLACE]", " naps.", eot),
    )
    g = dec_of(scorer=scorer, guard=guard)
    yield "rollback", g, Request(USER), _turn(g, SAFE, PLANTED, " The capital is Paris.", eot)
    yield "rollback at the end", g, Request(USER), _turn(g, SAFE, PLANTED, eot)
    flagged = Request(USER, prefill=PLANTED.strip() + " And")
    yield "rollback of the prefill", g, flagged, _turn(g, " so on.", SAFE, eot)
    yield "rollback after the prefill", g, Request(USER, prefill=SAFE), _turn(g, PLANTED, eot)
    yield "refusal", g, Request(USER), _turn(g, SAFE, PLANTED, PLANTED, PLANTED, PLANTED)
    yield "rollback over an edit", g, Request(USER), _turn(
        g, SAFE, " It bites.", "[BACKTRACK-VIOLENCE]", " It bites.", "[REPLACE]", " It naps.",
        PLANTED, " It is calm.", eot,
    )  # fmt: skip


def test_every_decoded_turn_rerenders_to_its_visible_text(model_dir, scorer):
    def dec_of(**cfg):
        return decoder(model_dir, temperature=0, max_new_tokens=90, **cfg)

    kinds = set()
    for name, dec, request, script in _scenarios(dec_of, scorer):
        [out] = dec.decode([request], processors=[Script([script])])
        row = json.loads(json.dumps(out.to_dict()))  # as `retrace generate` writes it
        assert rerender(row, dec.tokenizer) == out.visible, name
        assert len(row["offsets"]) == out.emitted_tokens, name
        kinds |= {e.kind for e in out.events}
        if name in ("spelled", "own policy"):
            # Spelled control strings stay text; a regex over prefill + raw reads them as edits.
            assert SPELLED in out.visible and SPELLED in plain(row), name
            assert render(row["prefill"] + row["raw"]) != out.visible, name
            assert "[RESET]" not in controls(row), name
    # Every kind of event the decoder records was re-rendered at least once.
    assert kinds >= {"backtrack", "replace", "reset", "category", "backtrack_by", "budget"}
    assert kinds >= {"stop_string", "rollback", "refusal"}

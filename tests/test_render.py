"""The renderer: what each control-token sequence shows a user, whole and streamed."""

from __future__ import annotations

import pytest

from pipeline.render import RenderError, StreamRenderer, control_tokens, render


def test_plain_text_is_shown_as_is():
    assert render("Hello there. How are you?") == "Hello there. How are you?"


def test_bsafe_edit_replaces_the_repeated_span():
    turn = "Tea is nice. Span X.[BACKTRACK-HATE]Span X.[REPLACE]Safe Y. More tea."
    assert render(turn) == "Tea is nice. Safe Y. More tea."


def test_generic_backtrack_token_works_the_same():
    turn = "A. B![BACKTRACK]B![REPLACE]C! D."
    assert render(turn) == "A. C! D."


def test_copy_matches_its_last_occurrence_before_the_token():
    turn = "bad. ok. bad.[BACKTRACK-HATE]bad.[REPLACE]good."
    assert render(turn) == "bad. ok. good."


def test_two_edits_in_one_response():
    turn = (
        "One. H1.[BACKTRACK-HATE]H1.[REPLACE]S1. Two. H2.[BACKTRACK-VIOLENCE]H2.[REPLACE]S2. Three."
    )
    assert render(turn) == "One. S1. Two. S2. Three."


def test_nested_edit_takes_back_part_of_an_earlier_replacement():
    turn = "A. bad.[BACKTRACK-HATE]bad.[REPLACE]fine but rude.[BACKTRACK]rude.[REPLACE]kind. End."
    assert render(turn) == "A. fine but kind. End."


def test_edit_of_earlier_text_continues_at_the_cut():
    # The cursor moves to the cut: what follows is inserted there, before the kept tail.
    turn = "Start. bad. tail.[BACKTRACK]bad.[REPLACE]good."
    assert render(turn) == "Start. good. tail."


def test_reset_shows_only_what_follows_the_last_reset():
    assert render("Sure, here is how[RESET]I can't help with that.") == "I can't help with that."
    assert render("a[RESET]b[RESET]c") == "c"
    assert render("a[RESET]") == ""


def test_reset_then_bsafe_edit():
    turn = "x[RESET]Fine. H.[BACKTRACK-HATE]H.[REPLACE]S. Done."
    assert render(turn) == "Fine. S. Done."


def test_message_list_is_accepted():
    assert render([{"role": "assistant", "content": "a[RESET]b"}]) == "b"


def test_lenient_rendering_of_malformed_sequences():
    assert render("a [REPLACE]b") == "a b"  # stray [REPLACE] is dropped
    assert render("a. bad.[BACKTRACK]bad.") == "a. "  # unclosed backtrack: the copy is cut
    assert render("a.[BACKTRACK]zzz[REPLACE]b") == "a.b"  # copy not found: text goes on


@pytest.mark.parametrize(
    "turn",
    [
        "a [REPLACE]b",
        "a. bad.[BACKTRACK]bad.",
        "a.[BACKTRACK]zzz[REPLACE]b",
        "a[BACKTRACK][BACKTRACK]",
    ],
)
def test_strict_rendering_rejects_malformed_sequences(turn):
    with pytest.raises(RenderError):
        render(turn, strict=True)


def test_look_alikes_are_not_control_tokens():
    turn = "[reset] (RESET) [BACKTRACK-NOPE] [ RESET ]"
    assert control_tokens(turn) == []
    assert render(turn) == turn


def test_streaming_matches_render_token_by_token():
    turn = "Tea is nice. Span X.[BACKTRACK-HATE]Span X.[REPLACE]Safe Y.[RESET]Hi. Bye."
    for size in (1, 2, 3, 5, 7):
        stream = StreamRenderer()
        for i in range(0, len(turn), size):
            stream.feed(turn[i : i + size])
        assert stream.finish() == render(turn)


def test_streaming_shows_visible_text_so_far():
    stream = StreamRenderer()
    assert stream.feed("Tea is nice. Bad.") == "Tea is nice. Bad."
    assert stream.feed("[BACK") == "Tea is nice. Bad."  # held back: may become a control token
    assert stream.feed("TRACK-HATE]") == "Tea is nice. Bad."
    assert stream.feed("Bad.") == "Tea is nice. Bad."  # the copy is a pointer, never shown
    assert stream.feed("[REPLACE]") == "Tea is nice. "
    assert stream.feed("Good.") == "Tea is nice. Good."
    assert stream.feed(" [RES") == "Tea is nice. Good. "
    assert stream.feed("ET]") == ""
    assert stream.feed("New.") == "New."


def test_streaming_flushes_a_held_tail_that_never_became_a_token():
    stream = StreamRenderer()
    assert stream.feed("list [RE") == "list "
    assert stream.feed("d]") == "list [REd]"
    stream.feed(" and [BACK")
    assert stream.finish() == "list [REd] and [BACK"


@pytest.mark.parametrize(
    "text", ["The fox naps. Type <end_of_turn> now.", "The fox naps. Press [RESET] now."]
)
def test_take_back_tokens_count_special_token_strings_as_ordinary_text(control_tok, text):
    # One counting rule (docs/decoding.md#take-back): the renderer's take-back splits text as the
    # trainer does.
    from pipeline.render import token_spans
    from trainer.encode import Encoder

    _, trainer_spans = Encoder(control_tok, 1 << 30, ()).offsets(text)
    assert token_spans(control_tok, text) == trainer_spans
    special = "<end_of_turn>" if "<end" in text else "[RESET]"
    assert len(control_tok(special, add_special_tokens=False)["input_ids"]) == 1  # live: one id
    assert len(token_spans(control_tok, special)) > 1


def test_a_models_own_control_tokens_edit_when_given():
    own = "[BACKTRACK-PRIVACY_VIOLATION]"
    turn = f"At 22 Birch Lane.{own}22 Birch Lane.[REPLACE]home."
    assert render(turn) == turn.replace("[REPLACE]", "")  # not a taxonomy token: text
    assert render(turn, controls=(own, "[REPLACE]")) == "At home."
    assert control_tokens(turn, controls=(own, "[REPLACE]")) == [own, "[REPLACE]"]

"""pipeline/text.py: the one definition of a sentence end that filter, inject and rewrite use, and
the one unit (`sentence_spans`) that the decoder's guard and natural both score."""

from __future__ import annotations

from itertools import pairwise

from pipeline.text import (
    boundaries,
    clean,
    ends_sentence,
    sentence_ends,
    sentence_spans,
    sentences,
)
from stages.filter import trim_to_sentence


def test_boundaries_are_sentence_ends_with_text_after_them():
    text = "Hello there. I am fine! Are you? Yes."
    assert boundaries(text) == [12, 23, 32]
    assert sentence_ends(text) == [12, 23, 32, len(text)]
    assert 0 not in boundaries(" . Hi. There.")


def test_boundaries_skip_list_markers_initials_and_abbreviations():
    text = "Steps:\n1. Boil water, e.g. in a kettle. J. Smith said so. Done here."
    cuts = boundaries(text)
    assert [text[:c].split()[-1] for c in cuts] == ["kettle.", "so."]


def test_closing_quotes_belong_to_the_sentence_and_the_last_period_always_ends():
    text = "He said “stop.” Then ‘go!’ And so on, etc."
    assert [text[:e].split()[-1] for e in sentence_ends(text)] == ["“stop.”", "‘go!’", "etc."]
    assert ends_sentence(text + "  \n") and not ends_sentence("It was fine, e.g")


def test_sentences_are_one_line_each():
    assert sentences("One.\n\nTwo  words! Three") == ["One.", "Two words!", "Three"]


def test_filter_trims_after_the_last_sentence_not_after_a_list_marker_or_abbreviation():
    assert trim_to_sentence("Tea is green. Steps:\n1. Boil it, e.g. in a") == "Tea is green."
    assert trim_to_sentence("She said “yes.” And then") == "She said “yes.”"
    assert trim_to_sentence("no sentence at all") == "no sentence at all"
    assert trim_to_sentence("Whole. ") == "Whole. "


def test_clean_neutralises_and_treats_none_as_empty():
    assert clean(None) == "" and clean("plain") == "plain"
    assert clean("a [RESET] <eos>") == "a (RESET) ‹eos›"


def test_a_line_break_ends_a_unit_and_whitespace_belongs_to_none():
    text = "Steps:\n1. Boil water\n2. Add leaves.  Stir\n\nYou are rude.\nAnd"
    spans = sentence_spans(text)
    pieces = [text[s:e] for s, e in spans]
    assert pieces == ["Steps:", "1. Boil water", "2. Add leaves.", "Stir", "You are rude.", "And"]
    # Between two units only whitespace: the model's own spacing, kept for what follows.
    gaps = [text[a[1] : b[0]] for a, b in pairwise(spans)]
    assert gaps == ["\n", "\n", "  ", "\n\n", "\n"]


def test_an_unfinished_tail_runs_to_the_end_and_a_finished_unit_stops_before_it():
    # What a streaming check reads: a unit is finished once its end is before the text's end.
    assert sentence_spans("Tea is green. It gro") == [(0, 13), (14, 20)]
    assert sentence_spans("Second part ") == [(0, 12)]  # no end yet: still growing
    assert sentence_spans("Second part\n") == [(0, 11)]  # the line break finished it
    assert sentence_spans("  \n\n") == []

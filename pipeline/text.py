"""Plain-text helpers every stage shares: where sentences end, and neutralised text.

One definition of a sentence end serves filter (cutting a stray tail), inject (where a harmful
span may go), rewrite (cutting a replacement to one sentence, a cut-off refusal to whole ones):
`.`, `!` or `?`, plus any closing quotes or brackets, followed by whitespace or the end of the
text. A period after a list marker ("1."), an initial ("J.") or a common abbreviation ("e.g.",
"Dr.") ends no sentence unless it ends the text.

One definition of the unit a scorer judges, `sentence_spans`, serves the decoder's scorer-guided
rollback (pipeline/decode) and `natural`, which turns a toxic sample into the row that rollback
would make: a sentence end or a line break closes a unit (list items and headings end without a
period), and the whitespace between units belongs to neither, so a rollback to the end of the
last safe unit keeps the model's own spacing after it for whatever comes next.
"""

from __future__ import annotations

import re
from itertools import pairwise

from pipeline import taxonomy

_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
# Periods that end no sentence: list markers ("1."), initials ("J.") and common abbreviations.
_NOT_AN_END = re.compile(r"(?:\d{1,3}|[A-Za-z]|e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|St|No|Fig)", re.I)
_LOOKBACK = 8  # longer than any word _NOT_AN_END matches, so a longer one never needs a look


def sentence_ends(text: str) -> list[int]:
    """Char offsets right after each sentence end (its punctuation and closing quotes)."""
    out = []
    for m in _END.finditer(text):
        if m.end() < len(text) and text[m.start()] == ".":
            before = text[max(0, m.start() - _LOOKBACK) : m.start()].rsplit(None, 1)
            if before and _NOT_AN_END.fullmatch(before[-1].lstrip("([\"'“‘")):
                continue
        out.append(m.end())
    return out


def ends_sentence(text: str) -> bool:
    """Does `text` end a sentence (trailing whitespace aside)?"""
    text = text.rstrip()
    ends = sentence_ends(text)
    return bool(ends) and ends[-1] == len(text)


def boundaries(text: str) -> list[int]:
    """The sentence ends with more text after them: where a text can be cut in two."""
    return [e for e in sentence_ends(text) if text[e:].strip()]


def sentences(text: str) -> list[str]:
    """`text` split at its sentence boundaries, each sentence on one line."""
    cuts = [0, *boundaries(text), len(text)]
    return [" ".join(text[a:b].split()) for a, b in pairwise(cuts) if text[a:b].strip()]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) char offsets of each unit a scorer judges: a sentence, or a line (a line
    break ends one too), whitespace on either side left out. An unfinished tail (no sentence end
    or line break after it yet) is the last span and runs to the end of `text`, whitespace and
    all, so a streaming check can tell a finished unit (end < len(text)) from one still growing."""
    cuts = sorted({*sentence_ends(text), *(m.end() for m in re.finditer("\n", text))})
    spans, start = [], 0
    for end in [*cuts, len(text)]:
        piece = text[start:end]
        if piece.strip():
            finished = end in cuts
            stop = start + len(piece.rstrip()) if finished else end
            spans.append((start + len(piece) - len(piece.lstrip()), stop))
        start = end
    return spans


def clean(text: str | None) -> str:
    """`text` (None as "") with control and special token strings neutralised
    (docs/data-contract.md#control-tokens)."""
    text = text or ""
    # Every control or special token string holds "[" or "<": most texts skip the regexes.
    return taxonomy.neutralise(text)[0] if "[" in text or "<" in text else text

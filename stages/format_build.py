"""The segment layouts of each recipe, as pure functions (the `format` stage's builders).

Each builder returns the assistant turn as segments `[{text, role, train}]` plus the visible text
the recipe intends, worked out without the renderer so that `format` can check the two agree.
Wherever untrained text meets trained text, the trained side starts right at the boundary and
carries any spacing (docs/data-contract.md#boundary-rule): a space left on the untrained side would
be a token the model never learns to emit before its control token or refusal.
"""

from __future__ import annotations

import math
import random
import re
from itertools import pairwise
from typing import Any

from pipeline import taxonomy

Segment = dict[str, Any]

_WORD = re.compile(r"\S+")


def seg(text: str, role: str, train: bool) -> Segment:
    return {"text": text, "role": role, "train": train}


def _compact(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments if s["text"]]


def bsafe(
    text: str,
    edits: list[tuple[int, str, str, str, str]],
    train_prefix: bool,
    train_copy: bool,
) -> tuple[list[Segment], str]:
    """Benign text with BSAFE edits: for each (at, lead, span, backtrack_token, replacement),
    sorted by `at`: text up to `at` · the lead whitespace and the span (never trained) · backtrack
    token · span repeated · [REPLACE] · replacement; then the rest of the text.

    The whitespace before a span (inject's one space, or a natural span's own line breaks) goes
    with the span, so trained text never ends in a lone space token and the span tokenises as it
    would mid-text (" Bad" rather than " " + "Bad"). The visible text is the clean text with each
    replacement where its span was, after the same whitespace.
    """
    replace = taxonomy.load().replace_token
    segments: list[Segment] = []
    visible: list[str] = []
    prev = 0
    for i, (at, lead, span, token, replacement) in enumerate(edits):
        before = text[prev:at]
        visible += [before, lead, replacement]
        segments += [
            seg(before, "text", train_prefix or i > 0),
            seg(lead + span, "harmful", False),
            seg(token, "control", True),
            seg(span, "copy", train_copy),
            seg(replace, "control", True),
            seg(replacement, "replacement", True),
        ]
        prev = at
    segments.append(seg(text[prev:], "text", True))
    visible.append(text[prev:])
    return _compact(segments), "".join(visible)


def rlbf(
    text: str, edits: list[tuple[int, str, str, str, str]], train_prefix: bool
) -> tuple[list[Segment], str]:
    """Benign text with RLBF take-backs (Sel et al. 2026): for each (at, lead, span,
    category_token, backtrack_by_token), sorted by `at`: text up to `at` · the lead whitespace and
    the span (never trained) · category token · backtrack-by token; then the rest of the text, the
    safe continuation.

    No repeated span, no [REPLACE]: the take-back deletes the span's tokens and generation goes
    on where the benign text left off, so the visible text is the clean benign text. RLBF's input
    is p ⊕ part1 ⊕ v and its target `[CATEGORY_c]` ⊕ `[BACKTRACK_BY_X]` ⊕ part2, so the text
    before the first violation is untrained unless `train_prefix`; text between two violations is
    the first one's continuation and trained.
    """
    segments: list[Segment] = []
    prev = 0
    for i, (at, lead, span, category, backtrack_by) in enumerate(edits):
        segments += [
            seg(text[prev:at], "text", train_prefix or i > 0),
            seg(lead + span, "harmful", False),
            seg(category, "control", True),
            seg(backtrack_by, "control", True),
        ]
        prev = at
    segments.append(seg(text[prev:], "text", True))
    return _compact(segments), text


def word_prefix(text: str, lo: float, hi: float, rng: random.Random) -> str:
    """A prefix of `text` ending at a word end, of j words with j ~ U{ceil(lo·n)..floor(hi·n)},
    at least one word; no trailing space (it would sit on the untrained side)."""
    ends = [m.end() for m in _WORD.finditer(text)]
    if not ends:
        return ""
    n = len(ends)
    low = max(1, math.ceil(lo * n - 1e-9))
    high = max(low, min(n, int(hi * n)))
    return text[: ends[rng.randint(low, high) - 1]]


def reset(prefix: str, safe: str) -> tuple[list[Segment], str]:
    """prefix(y-) (never trained) · [RESET] · y+ (Zhang et al.); visible is y+."""
    token = taxonomy.load().reset_token
    segments = [seg(prefix, "harmful", False), seg(token, "control", True), seg(safe, "safe", True)]
    return _compact(segments), safe


def plain(safe: str, role: str = "safe") -> tuple[list[Segment], str]:
    """The plain (x, y+) example: the whole turn trained."""
    return [seg(safe, role, True)], safe


def untrained_space(segments: list[Segment]) -> bool:
    """True when an untrained segment ends in whitespace right before a trained one."""
    return any(
        not a["train"] and b["train"] and a["text"][-1:].isspace() for a, b in pairwise(segments)
    )

"""Qi et al.'s recovery example h≤k · r: the k draw and the prefix/refusal joint, defined once.

The format stage publishes rows with it and the trainer redraws k every epoch with it
(docs/formats.md#recovery), so what is trained is always a row the format stage could have
published:

- k: P(k=0) = p_zero, else k ~ U{1..k_max}, uniform under the row's own bound k_max =
  min(cap, |h|), never a 1..cap draw clipped to |h| (which piles rows up at |h|,
  docs/formats.md#recovery); |h| counts target-tokenizer tokens without h's end of sequence, so the
  prefix never holds it.
- the prefix is the text of h's first k tokens, cut at char offsets (never inside a character);
- the joint (docs/data-contract.md#boundary-rule): the prefix's trailing whitespace moves to the
  refusal's trained side; with none, `separator` joins them there, so the refusal never glues onto a
  word ("…GetI can't").
"""

from __future__ import annotations

import random
from typing import Any

Segment = dict[str, Any]
Offsets = list[tuple[int, int]]

# The draw's settings, the one default of each: the format stage's config takes them, and the
# trainer reads what format used from the published folder (pipeline/handoff.py).
P_ZERO = 0.5  # Qi et al.: P(k=0) = 0.5
K_CAP = 100  # Qi et al.: k ~ U{1..min(100, |h|)}
SEPARATOR = " "  # joins h≤k and r on the trained side when h≤k ends mid-word (the joint above)


def k_draw(rng: random.Random, h_tokens: int, p_zero: float, cap: int) -> tuple[int, int]:
    """(k, k_max): P(k=0) = p_zero, else k ~ U{1..k_max} with k_max = min(cap, h_tokens)."""
    k_max = min(cap, h_tokens)
    zero = rng.random() < p_zero
    if zero or k_max == 0:
        return 0, k_max
    return rng.randint(1, k_max), k_max


def token_prefix(text: str, offsets: Offsets, k: int) -> tuple[str, int]:
    """The text of `text`'s first k tokens (char offsets), and how many tokens the untrained
    prefix really holds.

    A character split over several byte-level tokens (they share one offset span) cannot be cut
    in the middle: k moves back to the last whole character, so the count never exceeds the
    draw. Tokens that are only trailing whitespace are not counted, since the joint moves that
    whitespace to the trained side.
    """
    while 0 < k < len(offsets) and offsets[k][0] < offsets[k - 1][1]:
        k -= 1
    end = max((e for _, e in offsets[:k]), default=0)
    kept = len(text[:end].rstrip())
    return text[:end], sum(1 for _, e in offsets[:k] if e <= kept)


def turn(prefix: str, refusal: str, separator: str) -> tuple[list[Segment], str]:
    """Segments and visible text of h≤k (never trained) · refusal (trained, no special token)."""
    kept = prefix.rstrip()
    if not kept:
        return [{"text": refusal, "role": "refusal", "train": True}], refusal
    joint = prefix[len(kept) :] or separator
    segments = [
        {"text": kept, "role": "harmful", "train": False},
        {"text": joint + refusal, "role": "refusal", "train": True},
    ]
    return segments, kept + joint + refusal


def draw(
    h: str,
    offsets: Offsets,
    refusal: str,
    rng: random.Random,
    p_zero: float,
    cap: int,
    separator: str,
) -> tuple[list[Segment], str, int, int]:
    """(segments, visible, k, k_max) of one recovery example of h and its refusal."""
    k, k_max = k_draw(rng, len(offsets), p_zero, cap)
    prefix, k = token_prefix(h, offsets, k)
    segments, visible = turn(prefix, refusal, separator)
    return segments, visible, k, k_max


def refusal_of(segments: list[Segment], separator: str) -> str | None:
    """The refusal r of a published recovery row, without the joint `turn` put before it.

    The format stage strips r, so the joint is the refusal segment's leading whitespace, or the
    separator when that is not whitespace. None when the row has no refusal segment.
    """
    text = next((s["text"] for s in segments if s["role"] == "refusal"), None)
    if text is None:
        return None
    if separator.strip() and text.startswith(separator):
        return text[len(separator) :]
    return text.lstrip()

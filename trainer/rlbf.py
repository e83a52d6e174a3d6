"""rlbf's `[BACKTRACK_BY_<n>]` re-counted in the tokenizer being trained (issue 21).

The format stage counts n in its `target_tokenizer` (the row's meta.tokenizer). A model trained
with another tokenizer (`make train`'s `corpus:2048`, say) would learn an n that is wrong in its own
tokens, and the decoder would leave the span's first tokens visible or take back benign text. So
every row holding a take-back is re-counted here, for the trainer and for publish's `-tok` twins
alike, by the decoder's own rule (pipeline/render.py): a take-back removes the last n tokens of the
canonical split of the visible text before the cursor (`render.token_spans`, `render.token_cut`),
so n is how many of those tokens the harmful span before the category token covers, and the cut
must land exactly where the span starts. The visible text comes from the renderer itself
(`StreamRenderer`), so earlier edits of the row count as the decoder counts them.

A row is dropped, with a reason, when no n takes back exactly its span: `span_too_long` (more
tokens than the taxonomy's largest `[BACKTRACK_BY_<n>]`), `take_back_not_token_aligned` (a token of
the visible text straddles the span's start) or `take_back_without_span` (no harmful span and
category token right before the take-back: nothing says what n should cover).
"""

from __future__ import annotations

from typing import Any

from pipeline import render, taxonomy

Segment = dict[str, Any]


def takes_back(segments: list[Segment]) -> bool:
    """Does the row hold an RLBF take-back (`[BACKTRACK_BY_<n>]`)?"""
    tax = taxonomy.load()
    return any(
        s["role"] == "control" and tax.backtrack_by_count(s["text"]) is not None for s in segments
    )


def recount(segments: list[Segment], tokenizer: Any) -> tuple[list[Segment], int] | str:
    """`segments` with each take-back's n counted in `tokenizer`, and how many n changed; or a
    drop reason."""
    tax = taxonomy.load()
    stream = render.StreamRenderer(tokenizer=tokenizer, hold=0)
    out: list[Segment] = []
    span_at: int | None = None  # where the harmful span before the cursor starts
    changed = 0
    for seg in segments:
        text = seg["text"]
        if seg["role"] != "control":
            span_at = stream.cursor if seg["role"] == "harmful" else None
            stream.feed_text(text)
            out.append(seg)
            continue
        old = tax.backtrack_by_count(text)
        if old is not None:
            after_category = out and out[-1]["role"] == "control"
            if span_at is None or not after_category or out[-1]["text"] not in tax.category_tokens:
                return "take_back_without_span"
            before = stream.visible[: stream.cursor]
            n = sum(1 for _, end in render.token_spans(tokenizer, before) if end > span_at)
            if n == 0:
                return "take_back_without_span"
            if n > tax.backtrack_by_max:
                return "span_too_long"
            if render.token_cut(tokenizer, before, n) != span_at:
                return "take_back_not_token_aligned"
            changed += n != old
            seg = {**seg, "text": tax.backtrack_by(n)}
            span_at = None
        elif text not in tax.category_tokens:
            span_at = None
        if seg["text"] in tax.all_tokens:  # a corpus's own control token edits nothing here
            stream.feed(seg["text"])
        out.append(seg)
    return out, changed

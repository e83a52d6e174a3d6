"""A decoded turn as a record that describes itself: which emitted tokens were real control tokens,
and its visible text recomputed from the record alone (`rerender`).

A record is `Decoded.to_dict()` (what `retrace generate` writes) or an eval GENERATIONS row: `raw`,
`offsets` (where each emitted token's text starts in `raw`), `prefill` (the text the turn started
with) and `events` (a list, or its JSON). A control token is real where an event names it at its
token's position; anywhere else a control string in `raw` is text the model spelled in ordinary
tokens, which edits nothing (docs/data-contract.md#control-tokens). Flags come from these, never
from a regex over raw text (docs/decoding.md#events).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pipeline import taxonomy
from pipeline.render import StreamRenderer


def events(turn: dict[str, Any]) -> list[dict[str, Any]]:
    ev = turn.get("events") or []
    return json.loads(ev) if isinstance(ev, str) else list(ev)


def tokens(turn: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Each emitted token as (its text in `raw`, the control token it is or None)."""
    raw, offsets = turn["raw"] or "", list(turn.get("offsets") or ())
    real = {e["position"]: e["token"] for e in events(turn) if e.get("token")}
    ends = [*offsets[1:], len(raw)]
    return [(raw[a:b], real.get(i)) for i, (a, b) in enumerate(zip(offsets, ends, strict=True))]


def controls(turn: dict[str, Any]) -> list[str]:
    """The real control tokens the turn emitted, in order (one the edit budget stopped too)."""
    return [c for _, c in tokens(turn) if c is not None]


def plain(turn: dict[str, Any]) -> str:
    """The prefill and every emitted token's text but the real control tokens': the text the
    model produced, whether or not the user saw it (a literal "[RESET]" it spelled stays)."""
    return (turn.get("prefill") or "") + "".join(t for t, c in tokens(turn) if c is None)


def rerender(turn: dict[str, Any], tokenizer: Any = None) -> str:
    """The turn's visible text from the record alone, as the decoder made it: the prefill, each
    emitted token (a real control token as its edit), scorer rollbacks, the edit budget, a stop
    string and a refusal. `tokenizer` (the model's) is needed only for RLBF's take-backs in their
    canonical reading."""
    evs = events(turn)
    toks = tokens(turn)
    names = {c for _, c in toks if c is not None}
    reading = next((e["detail"] for e in evs if e["kind"] == "backtrack_by"), "") or "canonical"
    renderer = StreamRenderer(
        tokenizer=tokenizer,
        hold=0,
        controls=tuple(dict.fromkeys([*taxonomy.load().all_tokens, *sorted(names)])),
        backtrack_by=reading,
    )
    saved = {-1: copy.deepcopy(renderer)}  # rollback targets: the state before that token
    if turn.get("prefill"):
        renderer.feed_text(turn["prefill"])  # no token: the prefill was not emitted
    skipped = {e["position"] for e in evs if e["kind"] == "budget" and e.get("token")}
    rollbacks = {e["position"]: e["restore"] for e in evs if e["kind"] == "rollback"}
    targets = set(rollbacks.values())
    for i, (text, control) in enumerate(toks):
        if i in targets and i not in saved:
            saved[i] = copy.deepcopy(renderer)
        if i in skipped:
            continue  # not applied: the turn ended before an edit it had no budget for
        if control is None:
            renderer.feed_text(text, i)
        else:
            renderer.control(control, text, i)
        if i in rollbacks:  # back to the state before token `restore` (saved on the way)
            renderer = copy.deepcopy(saved[rollbacks[i]])
    visible = renderer.finish()
    for e in evs:
        if e["kind"] == "stop_string":
            visible = visible[: visible.find(e["detail"])]
    refusal = next((e["detail"] for e in evs if e["kind"] == "refusal"), None)
    if turn.get("finish_reason") == "refused" and refusal is not None:
        joint = " " if visible and not visible[-1].isspace() else ""
        visible += joint + refusal
    return visible

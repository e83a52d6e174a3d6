"""One turn being decoded, whatever backend samples it: the result type and the state machine.

A `Sequence` takes sampled token ids one at a time (`accept`). It decodes them incrementally,
feeds the text to the `StreamRenderer` (so `visible` is always what a user sees), records an
`Event` per control token, keeps the token budgets, and says what the model must be conditioned
on next as `context` (prompt ids + assistant ids). A backend feeds `context[cached:]` and reports
what it fed; when an edit or a rollback changes `context` below what is cached, `crop` says how
many cached tokens to drop. Which control tokens open or close an edit, and what they take back,
is the renderer's business: the sequence only reads `visible`, `cursor` and `editing`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.decode.config import DecodeConfig
from pipeline.decode.controls import Controls, token_kind, token_policy
from pipeline.render import StreamRenderer
from pipeline.text import sentence_spans


@dataclass(frozen=True)
class Event:
    """Something that changed the turn, at the emitted token `position` (0-based)."""

    # backtrack | replace | reset | category | backtrack_by | control | rollback | refusal |
    # budget | stop_string (the visible text cut before a stop string, `detail`)
    kind: str
    position: int
    token: str | None = None  # the control token, for control-token events
    policy: str | None = None  # the policy it names (a replace takes its backtrack's)
    removed: str = ""  # visible text it took away from the user
    detail: str = ""
    # rollback: the emitted-token count the turn went back to (-1: to before the prefill)
    restore: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decoded:
    """One decoded turn.

    `raw` is every emitted token's text, control tokens inline (a rolled-back attempt stays in it;
    its events say where). `visible` is what the user sees: the renderer's output, with scorer
    rollbacks applied. The record describes itself (`pipeline.decode.record.rerender` recomputes
    `visible` from it): `prefill` is the text the turn started with, `offsets` where each emitted
    token's text starts in `raw`, and the events name every real control token by its position,
    so a control string the model spelled in ordinary tokens is never mistaken for one.

    Token counts: `emitted_tokens` counts every sampled token but the closing end of turn;
    `visible_tokens` those with text in `visible`; `wasted_tokens` the rest, emitted but never
    shown (taken-back spans, control tokens, copies, rolled-back attempts).
    """

    raw: str
    visible: str
    events: tuple[Event, ...]
    emitted_tokens: int
    visible_tokens: int
    wasted_tokens: int
    finish_reason: str  # stop | length | stop_string | edit_budget | wasted_budget | refused
    prompt_tokens: int
    seed: int
    prefill: str = ""
    offsets: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events"] = [e.to_dict() for e in self.events]
        out["offsets"] = list(self.offsets)
        return out


@dataclass(frozen=True)
class Update:
    """What a streaming caller (the chat UI) is told after each emitted token of a row."""

    row: int
    piece: str  # the token's decoded text ("" while a multi-byte character is incomplete)
    visible: str
    events: tuple[Event, ...]  # events of this token (control tokens, rollbacks, budget)


_NEVER = 1 << 62


def diff(before: str, after: str) -> tuple[int, int]:
    """(common prefix, common suffix) lengths of two texts, not overlapping: `after` is `before`
    with before[a:len(before)-b] replaced by after[a:len(after)-b]."""
    if after.startswith(before):
        return len(before), 0
    a = next((i for i, (x, y) in enumerate(zip(before, after, strict=False)) if x != y), None)
    a = min(len(before), len(after)) if a is None else a
    b = 0
    while b < min(len(before), len(after)) - a and before[-1 - b] == after[-1 - b]:
        b += 1
    return a, b


@dataclass
class _Snapshot:
    renderer: StreamRenderer
    context: list[int]
    texts: list[str]
    emitted: int
    checked: int


@dataclass
class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character (as TGI's and vLLM's):
    a token's text is the growth of a short window's decoding, held back while it ends in an
    incomplete character."""

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


class Sequence:
    """The state of one turn (see the module docstring)."""

    def __init__(
        self,
        row: int,
        prompt: list[int],
        prefill: list[int],
        cfg: DecodeConfig,
        controls: Controls,
        tokenizer: Any,
        encode_text: Callable[[str], list[int]],
        stop_ids: list[int],
        seed: int,
        positions: int | None = None,
    ) -> None:
        self.row, self.cfg, self.seed = row, cfg, seed
        self.positions = positions  # the model's positions: a turn ends before it runs past them
        self.controls, self.control_tokens = controls, controls.tokens
        self._encode_text, self.stop_ids = encode_text, set(stop_ids)
        self.prompt_len = len(prompt)
        self.context = list(prompt)  # what the model is (to be) conditioned on
        self.texts = [""] * len(prompt)  # each context token's text (assistant part only)
        self.cached = 0  # how many of `context` the backend holds in its KV cache
        self.crop = 0  # cached tokens the backend must drop before it feeds again
        self.emitted: list[int] = []
        self.raw = ""
        self._starts: list[int] = []  # raw offset of each emitted token's text
        self._detok = _Detokenizer(tokenizer)
        # With the tokenizer, RLBF's [BACKTRACK_BY_<n>] takes back n of this model's tokens; no
        # hold: the decoder shows text as it comes and records the take-back as an edit. The
        # controls are the model's own (its tokenizer's), not the taxonomy's list.
        self.renderer = StreamRenderer(
            tokenizer=tokenizer,
            hold=0,
            controls=tuple(controls.ids),
            backtrack_by=cfg.backtrack_by,
        )
        self.events: list[Event] = []
        self.edits = 0
        self.finishing: str | None = None  # why the turn is ending, once it is
        self.result: Decoded | None = None
        self.retries = 0
        self.temperature = cfg.temperature
        self.ban: int | None = None  # a token the next sample may not be (guard retry)
        self._checked = 0  # visible chars whose sentences the guard passed
        self._dirty = _NEVER  # leftmost visible char an edit changed since the last check
        self._pending_scores: list[tuple[int, int]] = []
        self._stop_token: int | None = None
        # The guard's most recent safe state, and the state before the current token (a sentence
        # is known to be complete only once the whitespace after it arrives).
        self._safe = self._before = self._snapshot() if cfg.guard else None
        self._start = self._safe  # before the prefill: a flagged prefill is taken back too
        self.prefill = ""
        if prefill:
            text = self.prefill = tokenizer.decode(prefill, skip_special_tokens=False)
            self.context += prefill
            self.texts += [""] * (len(prefill) - 1) + [text]
            self.renderer.feed_text(text)  # no token: the prefill was not emitted

    # --- what the backend asks ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def pending(self) -> list[int]:
        return self.context[self.cached :]

    def fed(self, n: int) -> None:
        """The backend put the next `n` pending tokens into its cache."""
        self.cached += n

    def take_crop(self) -> int:
        n, self.crop = self.crop, 0
        return n

    # --- one sampled token -------------------------------------------------------------------

    def accept(self, token: int) -> list[Event]:
        """Take a sampled token; returns the events it caused."""
        self.ban, self.last_piece = None, ""
        if self.cfg.guard is not None:
            self._before = self._snapshot()
        if token in self.stop_ids:
            self._stop_token, self.finishing = token, "stop"
            return []
        position = len(self.emitted)
        self._emit(token)
        self.context.append(token)
        self.texts.append(self.last_piece)
        events: list[Event] = []
        name = self.control_tokens.get(token)
        if name is None:
            self._show(self.last_piece, position)
        else:
            events += self._control(name, position)
        if self.finishing is None:
            events += self._budgets(position)
        if self.finishing is None and (
            len(self.emitted) >= self.cfg.max_new_tokens
            or (self.positions is not None and len(self.context) >= self.positions)
        ):
            self.finishing = "length"
        self.events += events
        return events

    def _emit(self, token: int) -> None:
        self._starts.append(len(self.raw))
        self.emitted.append(token)
        self.last_piece = self._detok.push(token)
        self.raw += self.last_piece

    def _control(self, name: str, position: int) -> list[Event]:
        was_editing = self.renderer.editing
        undo = copy.deepcopy(self.renderer)
        removed = self._show(self.last_piece, position, control=name)
        if not (was_editing and not self.renderer.editing):  # all but closing an edit count
            self.edits += 1
            if self.edits > self.cfg.max_edits:
                # Not applied: the turn ends before an edit it has no budget for.
                self.renderer = undo
                self.finishing = "edit_budget"
                detail = f"max_edits {self.cfg.max_edits} reached"
                return [Event("budget", position, name, detail=detail)]
        kind = token_kind(name)
        policy = token_policy(name)
        if kind in ("replace", "backtrack_by"):  # closes the edit its opener named
            opener = ("backtrack", "category")
            policy = next((e.policy for e in reversed(self.events) if e.kind in opener), None)
        # A take-back's detail says how its n was counted (decode.backtrack_by).
        detail = self.cfg.backtrack_by if kind == "backtrack_by" else ""
        events = [Event(kind, position, name, policy, removed, detail)]
        if self.cfg.context == "drop" and not self.renderer.editing:
            self._drop_to_visible()
        return events

    def _budgets(self, position: int) -> list[Event]:
        wasted = len(self.emitted) - self._visible_count()
        if wasted > self.cfg.max_wasted_tokens:
            self.finishing = "wasted_budget"
            detail = f"max_wasted_tokens {self.cfg.max_wasted_tokens} reached"
            return [Event("budget", position, detail=detail)]
        return []

    # --- the visible text ---------------------------------------------------------------------

    def _show(self, piece: str, position: int, control: str | None = None) -> str:
        """Feed the renderer: an ordinary token's text as plain text (so a control string spelled
        in ordinary tokens edits nothing), a control id as its control token; returns the visible
        text the token took away."""
        before = self.renderer.visible
        if control is None:
            after = self.renderer.feed_text(piece, position)
        else:
            after = self.renderer.control(control, piece, position)
        removed = self._track(before, after)
        if self.cfg.stop and self.finishing is None:
            start = max(0, len(before) - max(map(len, self.cfg.stop)))
            if any(s in after[start:] for s in self.cfg.stop):
                self.finishing = "stop_string"
        return removed

    def _track(self, before: str, after: str) -> str:
        """The visible text an update took away; notes the leftmost char it changed."""
        a, b = diff(before, after)
        if a < len(before):
            self._dirty = min(self._dirty, a)
        return before[a : len(before) - b]

    def _visible_count(self, marks: list[int | None] | None = None) -> int:
        """Emitted tokens with text in the visible text (the renderer's marks say which)."""
        marks = self.renderer.marks if marks is None else marks
        return len({m for m in marks if m is not None})

    # --- context: drop and rollback ---------------------------------------------------------

    def _drop_to_visible(self) -> None:
        """Condition the rest only on what the user sees before the cursor: keep the longest run
        of assistant tokens whose text is a prefix of it, and encode the remainder (a partial
        token's worth of text, usually nothing)."""
        target = self.renderer.visible[: self.renderer.cursor]
        keep, used = self.prompt_len, 0
        for i in range(self.prompt_len, len(self.context)):
            t = self.texts[i]
            if not target.startswith(t, used):
                break
            used += len(t)
            keep = i + 1
        while keep > self.prompt_len and not self.texts[keep - 1]:
            keep -= 1  # never end on a token whose text is still held (half a character)
        used = sum(len(t) for t in self.texts[self.prompt_len : keep])
        rest = target[used:]
        ids = self._encode_text(rest)
        texts = [""] * (len(ids) - 1) + [rest] if ids else []
        self._retarget(self.context[:keep] + ids, self.texts[:keep] + texts)

    def _retarget(self, context: list[int], texts: list[str]) -> None:
        same = 0
        for x, y in zip(self.context, context, strict=False):
            if x != y:
                break
            same += 1
        # The next token is predicted from the logits of the last context token, so at least
        # that one is fed again.
        same = min(same, len(context) - 1)
        if same < self.cached:
            self.crop += self.cached - same
            self.cached = same
        self.context, self.texts = list(context), list(texts)

    # --- scorer-guided rollback (guard) ---------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            copy.deepcopy(self.renderer),
            list(self.context),
            list(self.texts),
            len(self.emitted),
            self._checked,
        )

    def to_score(self) -> list[str]:
        """Sentences completed since the last check (the unfinished tail too, once the turn is
        ending), for the guard to score; call `scored` with their verdicts."""
        visible = self.renderer.visible
        spans = sentence_spans(visible)
        if self._dirty < self._checked:  # an edit changed checked text: recheck from there
            self._checked = max((e for _, e in spans if e <= self._dirty), default=0)
        self._dirty = _NEVER
        ending = self.finishing is not None
        self._pending_scores = [
            (s, e)
            for s, e in spans
            if e > self._checked and (ending or e < len(visible) or visible.endswith("\n"))
        ]
        return [visible[s:e] for s, e in self._pending_scores]

    def scored(self, verdicts: list[tuple[float, bool]]) -> list[Event]:
        """Each sentence's (score, flagged) from the guard's rule (pipeline/judges.Rule)."""
        spans, self._pending_scores = self._pending_scores, []
        for (s, e), (value, flagged) in zip(spans, verdicts, strict=True):
            if flagged:
                return self._rollback(self.renderer.visible[s:e], value)
            self._checked = e
        if spans and self.finishing is None:
            exact = self._before is not None and len(self._before.renderer.visible) == self._checked
            self._safe = self._before if exact else self._snapshot()
            self._safe.checked = self._checked
        return []

    def _rollback(self, sentence: str, value: float) -> list[Event]:
        guard = self.cfg.guard
        assert guard is not None
        if self._stop_token is not None:  # the end of turn it sampled is undone: it was wasted
            self._emit(self._stop_token)
            self._stop_token = None
        position = len(self.emitted) - 1  # the token after which the turn went back
        before = self.renderer.visible
        snap = self._safe
        self.renderer = copy.deepcopy(snap.renderer)
        self._checked, self._dirty = snap.checked, _NEVER
        self._retarget(snap.context, snap.texts)
        removed = before[len(self.renderer.visible) :]
        back = -1 if snap is self._start and self.prefill else snap.emitted
        detail = f"score {value:.3f}: {sentence}"
        if self.finishing == "length" or self.retries >= guard.retries:
            self.finishing = "refused" if self.finishing != "length" else "length"
            events = [Event("rollback", position, removed=removed, detail=detail, restore=back)]
            if self.finishing == "refused":
                events.append(Event("refusal", position, detail=guard.refusal))
            self.events += events
            return events
        self.finishing = None
        self.retries += 1
        if guard.temperature is not None:
            self.temperature = guard.temperature
        if guard.ban_first_token and snap.emitted < len(self.emitted):
            self.ban = self.emitted[snap.emitted]
        detail = f"retry {self.retries}, {detail}"
        event = Event("rollback", position, removed=removed, detail=detail, restore=back)
        self.events.append(event)
        return [event]

    # --- the end ----------------------------------------------------------------------------

    def finish(self) -> Decoded:
        visible = self.renderer.finish()
        marks = self.renderer.marks
        if self.cfg.stop:
            found = [(i, s) for s in self.cfg.stop if (i := visible.find(s)) >= 0]
            if found:
                cut, stop = min(found)
                at = len(self.emitted) - 1
                self.events.append(Event("stop_string", at, removed=visible[cut:], detail=stop))
                visible, marks = visible[:cut], marks[:cut]
        if self.finishing == "refused" and self.cfg.guard is not None:
            joint = " " if visible and not visible[-1].isspace() else ""
            visible += joint + self.cfg.guard.refusal
        shown = self._visible_count(marks)
        self.result = Decoded(
            raw=self.raw,
            visible=visible,
            events=tuple(self.events),
            emitted_tokens=len(self.emitted),
            visible_tokens=shown,
            wasted_tokens=len(self.emitted) - shown,
            finish_reason=self.finishing or "length",
            prompt_tokens=self.prompt_len,
            seed=self.seed,
            prefill=self.prefill,
            offsets=tuple(self._starts),
        )
        return self.result

"""The renderer: the single definition of what the control tokens mean (DESIGN §4).

An assistant turn is plain text with control tokens inline. The renderer turns it into what a user
sees, as a small editor with a cursor:

- plain text is inserted at the cursor (normally the end);
- `[BACKTRACK]` / `[BACKTRACK-<POLICY>]` starts an edit: the text after it, up to `[REPLACE]`, is a
  copy of earlier visible text, not output — it points at what to take back;
- `[REPLACE]` cuts the last occurrence of that copy before the cursor and puts the cursor where it
  was, so the text that follows replaces it (BSAFE repeat-and-replace, FORMATS.md);
- `[RESET]` clears everything shown so far: the visible text is what follows the last `[RESET]`
  (Zhang et al.: the earlier text stays in the model's context but is hidden from the user).

`render(text)` applies a whole turn; `StreamRenderer` takes tokens one by one and gives the visible
text so far, as a chat UI would show it. Both run the same `_Editor`, so they cannot disagree.
Only the exact token strings of the taxonomy count; look-alikes never reach a record because
`taxonomy.neutralise` defuses them first.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pipeline import taxonomy


class RenderError(ValueError):
    """A control-token sequence the renderer cannot apply (only raised with strict=True)."""


@cache
def _grammar() -> tuple[re.Pattern[str], frozenset[str], str, str]:
    tax = taxonomy.load()
    tokens = sorted(tax.control_tokens, key=len, reverse=True)  # longest first: no prefix wins
    backtracks = frozenset(t for t in tokens if t not in (tax.replace_token, tax.reset_token))
    pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")")
    return pattern, backtracks, tax.replace_token, tax.reset_token


def split(text: str) -> list[str]:
    """`text` as alternating plain pieces and control tokens (odd indices are tokens)."""
    return _grammar()[0].split(text)


def control_tokens(text: str) -> list[str]:
    """The control tokens in `text`, in order."""
    return split(text)[1::2]


class _Editor:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.visible = ""
        self.cursor = 0
        self.copy: list[str] | None = None  # the pointer text of an open [BACKTRACK], if any

    def _fail(self, message: str) -> None:
        if self.strict:
            raise RenderError(message)

    def text(self, piece: str) -> None:
        if not piece:
            return
        if self.copy is not None:
            self.copy.append(piece)
            return
        self.visible = self.visible[: self.cursor] + piece + self.visible[self.cursor :]
        self.cursor += len(piece)

    def control(self, token: str) -> None:
        _, backtracks, replace, reset = _grammar()
        if token == reset:
            self.visible, self.cursor, self.copy = "", 0, None
        elif token in backtracks:
            if self.copy is not None:
                self._fail(f"{token} opened while an earlier backtrack has no {replace}")
            self.copy = []
        elif token == replace:
            if self.copy is None:
                self._fail(f"{replace} without a backtrack token before it")
                return
            self._cut("".join(self.copy))
            self.copy = None

    def _cut(self, copy: str) -> None:
        at = self.visible.rfind(copy, 0, self.cursor)
        if at < 0:
            self._fail(f"backtracked text {copy[:60]!r} is not in the visible text before it")
            return
        self.visible = self.visible[:at] + self.visible[at + len(copy) :]
        self.cursor = at

    def finish(self) -> str:
        if self.copy is not None:
            # The model flagged text and stopped before rewriting it: taking it back is the safe
            # reading, so the copy is cut with an empty replacement.
            self._fail("the turn ends inside a backtrack (no [REPLACE])")
            self._cut("".join(self.copy))
            self.copy = None
        return self.visible


def _content(completion: str | list[dict[str, Any]]) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def render(completion: str | list[dict[str, Any]], strict: bool = False) -> str:
    """The visible text of an assistant turn (a string, or a `[{role, content}]` list).

    strict=True raises RenderError on a malformed sequence (a [REPLACE] without a backtrack, a
    copy that is not in the visible text, an unclosed backtrack) instead of applying the lenient
    reading a chat UI would.
    """
    return render_pieces(split(_content(completion)), strict)


def render_pieces(pieces: list[str], strict: bool = False) -> str:
    """`render` of a turn already `split` into plain pieces and control tokens."""
    editor = _Editor(strict)
    for i, piece in enumerate(pieces):
        if i % 2:
            editor.control(piece)
        else:
            editor.text(piece)
    return editor.finish()


class StreamRenderer:
    """Feed decoded tokens as they arrive; `visible` is the text a chat UI shows so far.

    A token string may be split across several decoded pieces (`[BACK`, `TRACK]`), so a tail that
    could still become a control token is held back until it is decided.
    """

    def __init__(self, strict: bool = False) -> None:
        self._editor = _Editor(strict)
        self._pending = ""
        tokens = taxonomy.load().control_tokens
        self._prefixes = frozenset(tok[:i] for tok in tokens for i in range(1, len(tok)))
        self._longest = max(map(len, tokens))

    def feed(self, piece: str) -> str:
        """Add decoded text; return the visible text so far."""
        pieces = split(self._pending + piece)
        tail = pieces.pop()  # plain text after the last complete token
        for i, p in enumerate(pieces):
            if i % 2:
                self._editor.control(p)
            else:
                self._editor.text(p)
        start = max(0, len(tail) - self._longest)
        hold = next((j for j in range(start, len(tail)) if tail[j:] in self._prefixes), len(tail))
        self._editor.text(tail[:hold])
        self._pending = tail[hold:]
        return self.visible

    @property
    def visible(self) -> str:
        return self._editor.visible

    @property
    def cursor(self) -> int:
        """Where the next plain text goes in `visible`: the end, unless an edit moved it."""
        return self._editor.cursor

    @property
    def editing(self) -> bool:
        """True while an edit is open (a backtrack still waiting for its [REPLACE])."""
        return self._editor.copy is not None

    def finish(self) -> str:
        """End of the turn: flush held-back text and close any open edit; the final visible text."""
        self._editor.text(self._pending)
        self._pending = ""
        return self._editor.finish()

"""The renderer: the single definition of what control tokens mean (docs/data-contract.md#render).

An assistant turn is plain text with control tokens inline. The renderer turns it into what a user
sees, as a small editor with a cursor:

- plain text is inserted at the cursor (normally the end);
- `[BACKTRACK]` / `[BACKTRACK-<POLICY>]` starts an edit: the text after it, up to `[REPLACE]`, is a
  copy of earlier visible text, not output — it points at what to take back;
- `[REPLACE]` cuts the last occurrence of that copy before the cursor and puts the cursor where it
  was, so the text that follows replaces it (BSAFE repeat-and-replace, docs/formats.md#bsafe);
- `[RESET]` clears everything shown so far: the visible text is what follows the last `[RESET]`
  (Zhang et al.: the earlier text stays in the model's context but is hidden from the user);
- `[CATEGORY-<POLICY>]` then `[BACKTRACK_BY_<n>]` (RLBF, Sel et al. 2026) deletes the last n tokens
  before the cursor and generation simply continues there. n counts tokens of the *target
  tokenizer* (the trained model's), so rendering such a turn needs that tokenizer (`tokenizer=`;
  the data card names it). Tokens are the canonical split of the visible text before the cursor,
  the same split the format stage counts n with and checks every row against, with special-token
  strings split as ordinary text (docs/decoding.md#take-back). A stream may count the last n tokens
  emitted instead (`backtrack_by="emitted"`, the decoder's `decode.backtrack_by`).

`render(text)` applies a whole turn; `StreamRenderer` takes tokens one by one and gives the visible
text so far, as a chat UI would show it (holding back the last tokens an RLBF take-back could still
delete). Both run the same `_Editor`, so they cannot disagree.
Only exact control-token strings count: the taxonomy's, or the ones given as `controls` (a model's
own, which may name policies the taxonomy has not; `taxonomy.classify` reads them by form).
Look-alikes never reach a record because `taxonomy.neutralise` defuses them first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from pipeline import taxonomy


class RenderError(ValueError):
    """A control-token sequence the renderer cannot apply (only raised with strict=True)."""


@dataclass(frozen=True)
class _Grammar:
    pattern: re.Pattern[str]
    backtracks: frozenset[str]  # BSAFE: generic and per-policy
    replaces: frozenset[str]
    resets: frozenset[str]
    categories: frozenset[str]  # RLBF
    backtrack_by: dict[str, int]  # RLBF: token -> how many tokens it takes back
    longest: int
    prefixes: frozenset[str]  # every proper prefix of a token: a tail that could still become one

    def __deepcopy__(self, memo: dict) -> _Grammar:
        return self  # immutable and shared: a renderer's snapshot need not copy it


@cache
def _grammar(controls: tuple[str, ...] | None = None) -> _Grammar:
    """The grammar of `controls` (a model's, `pipeline.decode.controls.model_controls`) or, by
    default, of every token of the taxonomy."""
    tax = taxonomy.load()
    kinds: dict[str, list[str]] = {}
    by: dict[str, int] = {}
    for t in tax.all_tokens if controls is None else controls:
        c = tax.classify(t)
        if c is None:
            raise ValueError(f"render: {t!r} is not a control token")
        kinds.setdefault(c.kind, []).append(t)
        if c.n is not None:
            by[t] = c.n
    tokens = sorted({t for ts in kinds.values() for t in ts}, key=len, reverse=True)
    return _Grammar(
        # longest first: no prefix wins; a grammar of no tokens matches nothing
        pattern=re.compile("(" + "|".join(map(re.escape, tokens)) + ")" if tokens else "(?!)"),
        backtracks=frozenset(kinds.get("backtrack", ())),
        replaces=frozenset(kinds.get("replace", ())),
        resets=frozenset(kinds.get("reset", ())),
        categories=frozenset(kinds.get("category", ())),
        backtrack_by=by,
        longest=max(map(len, tokens), default=0),
        prefixes=frozenset(tok[:i] for tok in tokens for i in range(1, len(tok))),
    )


def split(text: str, controls: tuple[str, ...] | None = None) -> list[str]:
    """`text` as alternating plain pieces and control tokens (odd indices are tokens)."""
    return _grammar(controls).pattern.split(text)


def token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """`text`'s target-tokenizer tokens as char spans (no special tokens added): the tokens an
    RLBF take-back counts. Special-token strings in it are split as ordinary text
    (docs/decoding.md#take-back: the trainer's and the decoder's rule), since the model emitted
    visible text as ordinary tokens: a visible "<end_of_turn>" or "[RESET]" is several tokens, never
    one."""
    return token_spans_of(tokenizer, [text])[0] if text else []


def token_spans_of(tokenizer: Any, texts: list[str]) -> list[list[tuple[int, int]]]:
    """`token_spans` of each text, in one tokenizer call: the one counting rule that format's n
    and k, the trainer's recount and the decoder's take-back share."""
    if not texts:
        return []
    enc = tokenizer(
        texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
    )
    return [[tuple(o) for o in offsets] for offsets in enc["offset_mapping"]]


def token_cut(tokenizer: Any, text: str, n: int) -> int:
    """Where the last n tokens of `text` begin: the end of the token before them (0 when n covers
    every token), so whitespace between two tokens goes with the taken-back one."""
    return _cut(token_spans(tokenizer, text), n)


def _cut(spans: list[tuple[int, int]], n: int) -> int:
    return spans[-n - 1][1] if n < len(spans) else 0


def control_tokens(text: str, controls: tuple[str, ...] | None = None) -> list[str]:
    """The control tokens in `text`, in order."""
    return split(text, controls)[1::2]


BACKTRACK_BY = ("canonical", "emitted")  # how `[BACKTRACK_BY_<n>]` counts its n tokens


class _Editor:
    def __init__(
        self,
        strict: bool,
        tokenizer: Any = None,
        controls: tuple[str, ...] | None = None,
        backtrack_by: str = "canonical",
    ) -> None:
        if backtrack_by not in BACKTRACK_BY:
            raise ValueError(f"backtrack_by {backtrack_by!r}: one of {', '.join(BACKTRACK_BY)}")
        self.strict = strict
        self.tokenizer = tokenizer
        self.grammar = _grammar(controls)
        self.backtrack_by = backtrack_by
        self.visible = ""
        # The emitted token each visible char came from (None: text not emitted, as a prefill):
        # what the `emitted` reading of [BACKTRACK_BY_<n>] counts, and the decoder's visible
        # token count.
        self.marks: list[int | None] = []
        self.token: int | None = None  # the token whose text is being inserted
        self.cursor = 0
        self.copy: list[str] | None = None  # the pointer text of an open [BACKTRACK], if any
        self.category: str | None = None  # an RLBF category token waiting for its take-back

    def _fail(self, message: str) -> None:
        if self.strict:
            raise RenderError(message)

    def _splice(self, a: int, b: int, piece: str = "") -> None:
        """Replace visible[a:b] with `piece` (written by the current token)."""
        self.visible = self.visible[:a] + piece + self.visible[b:]
        self.marks[a:b] = [self.token] * len(piece)

    def text(self, piece: str) -> None:
        if not piece:
            return
        if self.category is not None:
            self._fail(f"text after {self.category} where a [BACKTRACK_BY_<n>] token belongs")
            self.category = None
        if self.copy is not None:
            self.copy.append(piece)
            return
        self._splice(self.cursor, self.cursor, piece)
        self.cursor += len(piece)

    def control(self, token: str) -> None:
        g = self.grammar
        if self.category is not None and token not in g.backtrack_by:
            self._fail(f"{token} after {self.category} where a [BACKTRACK_BY_<n>] token belongs")
            self.category = None
        if token in g.resets:
            self._splice(0, len(self.visible))
            self.cursor, self.copy, self.category = 0, None, None
        elif token in g.categories or token in g.backtrack_by:
            if self.copy is not None:
                self._fail(f"{token} inside an open backtrack (no [REPLACE] yet)")
            elif token in g.categories:
                self.category = token
            else:
                if self.category is None:
                    self._fail(f"{token} without a category token before it")
                self.category = None
                self._take_back(token, g.backtrack_by[token])
        elif token in g.backtracks:
            if self.copy is not None:
                self._fail(f"{token} opened while an earlier backtrack has no [REPLACE]")
            self.copy = []
        elif token in g.replaces:
            if self.copy is None:
                self._fail(f"{token} without a backtrack token before it")
                return
            self._cut_copy("".join(self.copy))
            self.copy = None

    def _cut_copy(self, copy: str) -> None:
        at = self.visible.rfind(copy, 0, self.cursor)
        if at < 0:
            self._fail(f"backtracked text {copy[:60]!r} is not in the visible text before it")
            return
        self._splice(at, at + len(copy))
        self.cursor = at

    def spans(self) -> list[tuple[int, int]]:
        """The tokens of the visible text before the cursor, as a take-back counts them."""
        before = self.visible[: self.cursor]
        if self.backtrack_by == "canonical":
            return token_spans(self.tokenizer, before)
        # emitted: each run of chars one emitted token wrote is that token; text no token emitted
        # (a prefill) is counted canonically, as the model was given it.
        spans: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(before) + 1):
            if i < len(before) and self.marks[i] == self.marks[start]:
                continue
            if self.marks[start] is None:
                spans += [
                    (start + a, start + b) for a, b in token_spans(self.tokenizer, before[start:i])
                ]
            else:
                spans.append((start, i))
            start = i
        return spans

    def _take_back(self, token: str, n: int) -> None:
        if self.tokenizer is None:
            # No lenient reading exists: how much text n tokens are depends on the tokenizer.
            raise RenderError(
                f"{token} takes back {n} target-tokenizer tokens; pass tokenizer= (the "
                "tokenizer the data card names) to render this turn"
            )
        spans = self.spans()
        if n > len(spans):
            self._fail(f"{token} takes back {n} tokens but only {len(spans)} are visible before it")
        cut = _cut(spans, n)
        self._splice(cut, self.cursor)
        self.cursor = cut

    def finish(self) -> str:
        if self.category is not None:
            self._fail(f"the turn ends after {self.category} with no [BACKTRACK_BY_<n>]")
            self.category = None
        if self.copy is not None:
            # The model flagged text and stopped before rewriting it: taking it back is the safe
            # reading, so the copy is cut with an empty replacement.
            self._fail("the turn ends inside a backtrack (no [REPLACE])")
            self._cut_copy("".join(self.copy))
            self.copy = None
        return self.visible


def _content(completion: str | list[dict[str, Any]]) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def render(
    completion: str | list[dict[str, Any]],
    strict: bool = False,
    tokenizer: Any = None,
    controls: tuple[str, ...] | None = None,
) -> str:
    """The visible text of an assistant turn (a string, or a `[{role, content}]` list).

    strict=True raises RenderError on a malformed sequence (a [REPLACE] without a backtrack, a
    copy that is not in the visible text, an unclosed backtrack, a category token not followed
    by its take-back) instead of applying the lenient reading a chat UI would. `tokenizer` (a
    fast Hugging Face tokenizer) is needed only for RLBF's `[BACKTRACK_BY_<n>]` tokens.
    `controls` are the control-token strings that count (default: the taxonomy's).
    """
    return render_pieces(split(_content(completion), controls), strict, tokenizer, controls)


def render_pieces(
    pieces: list[str],
    strict: bool = False,
    tokenizer: Any = None,
    controls: tuple[str, ...] | None = None,
) -> str:
    """`render` of a turn already `split` into plain pieces and control tokens."""
    editor = _Editor(strict, tokenizer, controls)
    for i, piece in enumerate(pieces):
        if i % 2:
            editor.control(piece)
        else:
            editor.text(piece)
    return editor.finish()


class StreamRenderer:
    """Feed decoded tokens as they arrive; `visible` is the text a chat UI shows so far.

    A token string may be split across several decoded pieces (`[BACK`, `TRACK]`), so a tail that
    could still become a control token is held back until it is decided. With a `tokenizer`
    (needed for RLBF's take-backs) the last `hold` target tokens before the cursor are held back
    too, since a `[BACKTRACK_BY_<n>]` could still delete them; `hold` defaults to the largest n
    of the control tokens with a tokenizer and to 0 without one (then text an RLBF take-back
    deletes has been shown, as BSAFE's [REPLACE] edits text already shown). `controls` are the
    control-token strings that count (a model's; default: the taxonomy's). `backtrack_by` is how a
    take-back counts its n: `canonical` (the tokenizer's split of the visible text, what the
    format stage counts and the trainer trains) or `emitted` (the last n emitted
    tokens, as the `token` each piece is fed with says: RLBF's stream handler).
    """

    def __init__(
        self,
        strict: bool = False,
        tokenizer: Any = None,
        hold: int | None = None,
        controls: tuple[str, ...] | None = None,
        backtrack_by: str = "canonical",
    ):
        self._editor = _Editor(strict, tokenizer, controls, backtrack_by)
        self._pending = ""
        g = self._editor.grammar
        most = max(g.backtrack_by.values(), default=0)
        self._hold = hold if hold is not None else (most if tokenizer else 0)
        if self._hold and tokenizer is None:
            raise ValueError("StreamRenderer: hold > 0 counts target tokens; pass tokenizer=")

    def feed(self, piece: str, token: int | None = None) -> str:
        """Add decoded text; return the visible text so far. `token`: the emitted token it came
        from (what `marks` records; None: text not emitted, as a prefill)."""
        self._editor.token = token
        g = self._editor.grammar
        pieces = g.pattern.split(self._pending + piece)
        tail = pieces.pop()  # plain text after the last complete token
        for i, p in enumerate(pieces):
            if i % 2:
                self._editor.control(p)
            else:
                self._editor.text(p)
        start = max(0, len(tail) - g.longest)
        hold = next((j for j in range(start, len(tail)) if tail[j:] in g.prefixes), len(tail))
        self._editor.text(tail[:hold])
        self._pending = tail[hold:]
        return self.visible

    def feed_text(self, piece: str, token: int | None = None) -> str:
        """Add text known to be plain (decoded from ordinary token ids): never read as a control
        token, even when it spells one, so only real control ids edit
        (docs/data-contract.md#control-tokens). `token` as for `feed`."""
        self._editor.token = token
        self._editor.text(self._pending + piece)
        self._pending = ""
        return self.visible

    def control(self, token: str, piece: str | None = None, at: int | None = None) -> str:
        """Apply a control token known to be real (decoded from its id), emitted as token `at`.
        `piece` is the token's decoded text: text before the token string in it (the end of a
        character an earlier token began) is plain text."""
        self._editor.token = at
        lead = piece[: len(piece) - len(token)] if piece and piece.endswith(token) else ""
        self._editor.text(self._pending + lead)
        self._pending = ""
        self._editor.control(token)
        return self.visible

    @property
    def visible(self) -> str:
        editor = self._editor
        if not self._hold:
            return editor.visible
        # Only text before the cursor can be taken back; a BSAFE edit's kept tail stays shown.
        before, after = editor.visible[: editor.cursor], editor.visible[editor.cursor :]
        return before[: token_cut(editor.tokenizer, before, self._hold)] + after

    @property
    def marks(self) -> list[int | None]:
        """The emitted token each char of the editor's visible text came from (None: not
        emitted), as the `token`s fed said."""
        return self._editor.marks

    @property
    def cursor(self) -> int:
        """Where the next plain text goes in `visible`: the end, unless an edit moved it."""
        return self._editor.cursor

    @property
    def editing(self) -> bool:
        """True while an edit is open: a backtrack still waiting for its [REPLACE], or an RLBF
        category token waiting for its [BACKTRACK_BY_<n>]."""
        return self._editor.copy is not None or self._editor.category is not None

    def finish(self) -> str:
        """End of the turn: flush held-back text and close any open edit; the final visible text."""
        self._editor.text(self._pending)
        self._pending = ""
        return self._editor.finish()

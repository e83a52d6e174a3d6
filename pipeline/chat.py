"""`retrace chat`: an interactive terminal chat that shows edits as they happen.

The assistant's turn streams as the user sees it (the decoder's visible text). An edit does not
vanish silently: the text it takes back stays on screen struck through and dimmed, tagged with
what took it back (`↶ hate` for a backtrack token of policy hate, `↶ reset`, `↶ guard` for a
scorer rollback), and the replacement follows. `--show raw` prints the raw stream instead
(control tokens inline); `--show both` prints the transcript view, then the raw text dimmed.
The next turn's context is what the user saw: the visible text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.live import Live
from rich.text import Text

from pipeline.decode import Decoded, Request, Update
from pipeline.decode.sequence import diff

Show = Literal["raw", "visible", "both"]
STRUCK = "strike dim red"
TAG = "bold magenta"


@dataclass
class Transcript:
    """A turn as shown: segments of (text, kind), kind one of text, struck, tag. The `text`
    segments joined are the visible text; struck ones are what edits took back."""

    segments: list[list[str]] = field(default_factory=list)
    visible: str = ""

    def update(self, u: Update) -> None:
        for event in u.events:
            if event.kind == "backtrack":
                self._tag(f"↶ {event.policy or 'backtrack'}")
        a, b = diff(self.visible, u.visible)
        removed = len(self.visible) - b - a
        if removed > 0:
            self._strike(a, removed)
            kinds = {e.kind for e in u.events}
            if kinds & {"reset", "rollback"}:
                self._tag("↶ " + ("reset" if "reset" in kinds else "guard"), at=a + removed)
        inserted = u.visible[a : len(u.visible) - b]
        if inserted:
            self._insert(a, inserted)
        self.visible = u.visible

    def text(self) -> Text:
        out = Text()
        for piece, kind in self.segments:
            style = {"text": "", "struck": STRUCK, "tag": TAG}[kind]
            out.append(f" {piece} " if kind == "tag" else piece, style=style)
        return out

    # Positions are counted in visible characters; struck text and tags take none, and text
    # inserted at a position goes after any struck text and tags already there.
    def _split(self, at: int) -> int:
        """Index of the first segment at or after visible position `at` (splitting one)."""
        seen = 0
        for i, (piece, kind) in enumerate(self.segments):
            if kind != "text":
                continue
            if seen + len(piece) > at:
                if at > seen:
                    cut = at - seen
                    self.segments[i : i + 1] = [[piece[:cut], kind], [piece[cut:], kind]]
                    return i + 1
                return i
            seen += len(piece)
        return len(self.segments)

    def _strike(self, at: int, n: int) -> None:
        i = self._split(at)
        end = self._split(at + n)
        for seg in self.segments[i:end]:
            if seg[1] == "text":
                seg[1] = "struck"

    def _tag(self, label: str, at: int | None = None) -> None:
        i = len(self.segments) if at is None else self._after(at)
        self.segments.insert(i, [label, "tag"])

    def _insert(self, at: int, piece: str) -> None:
        i = self._after(at)
        if i > 0 and self.segments[i - 1][1] == "text" and i == len(self.segments):
            self.segments[i - 1][0] += piece
        else:
            self.segments.insert(i, [piece, "text"])

    def _after(self, at: int) -> int:
        i = self._split(at)
        # Skip struck text and tags sitting at this position: new text follows them.
        while i < len(self.segments) and self.segments[i][1] != "text":
            i += 1
        return i


def stream_turn(
    decoder: Any, messages: list[dict[str, str]], seed: int, console: Console, show: Show
) -> Decoded:
    """Decode one assistant turn, drawing it live; returns the decoded turn."""
    view, raw = Transcript(), Text(style="dim")
    with Live(Text(), console=console, refresh_per_second=12, transient=False) as live:

        def draw(u: Update) -> None:
            view.update(u)
            raw.append(u.piece)
            live.update(raw if show == "raw" else view.text())

        [turn] = decoder.decode([Request(messages, seed=seed)], on_update=draw)
        # The end of the turn can still change the text (an unclosed edit, a stop string).
        view.update(Update(0, "", turn.visible, ()))
        live.update(Text(turn.raw, style="dim") if show == "raw" else view.text())
    if show == "both":
        console.print(Text("raw: ", style="bold dim") + Text(turn.raw, style="dim"))
    if turn.events:
        edits = ", ".join(f"{e.kind}@{e.position}" for e in turn.events)
        console.print(
            f"[dim]{turn.emitted_tokens} tokens emitted, {turn.wasted_tokens} never shown; "
            f"{edits}[/dim]",
            highlight=False,
        )
    return turn


def chat(
    decoder: Any,
    console: Console,
    show: Show = "visible",
    seed: int = 0,
    ask: Callable[[], str] | None = None,
) -> None:
    """The chat loop: read a user line, stream the answer; `/quit` or end of input leaves."""
    ask = ask or (lambda: console.input("[bold cyan]you>[/] "))
    messages: list[dict[str, str]] = []
    console.print("[dim]retrace chat — /quit to leave, /reset to start over[/dim]")
    for turn_index in range(1 << 30):
        try:
            line = ask()
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        console.print("[bold green]model>[/]")
        turn = stream_turn(decoder, messages, seed + turn_index, console, show)
        messages.append({"role": "assistant", "content": turn.visible})

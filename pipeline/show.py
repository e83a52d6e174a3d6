"""Print corpus rows for a person to check by eye (`retrace show`).

Segments are coloured by what the trainer does with them: harmful text red (context, never
trained), control tokens bold, trained text green, other untrained text dim. Preference rows show
the prompt, then chosen and rejected with their control tokens bold.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from pipeline.render import split

_META_KEYS = (
    "origin",
    "k",
    "k_max",
    "h_tokens",
    "prefix_chars",
    "fallback",
    "template",
    "tokenizer",
)


def segment_text(segments: list[dict[str, Any]]) -> Text:
    """The assistant turn with each segment styled by role and loss flag."""
    out = Text()
    for s in segments:
        if s["role"] == "control":
            style = "bold green" if s["train"] else "bold"
        elif s["role"] == "harmful":
            style = "red"
        else:
            style = "green" if s["train"] else "dim"
        out.append(s["text"], style=style)
    return out


def _tokens_bold(content: str) -> Text:
    out = Text()
    for i, piece in enumerate(split(content)):
        out.append(piece, style="bold" if i % 2 else "")
    return out


def _facts(row: dict[str, Any]) -> str:
    meta = row.get("meta") or {}
    facts = [f"{k}={meta[k]}" for k in _META_KEYS if meta.get(k) is not None]
    policy = ",".join(row.get("policy") or []) or "-"
    return "  ".join([f"policy={policy}", f"source={row['source']}", *facts])


def show_rows(rows: list[dict[str, Any]], console: Console, n: int) -> None:
    """Print up to `n` rows of one config (SFT or preference) with coloured segments."""
    if not rows:
        console.print("[dim]no rows[/]")
        return
    console.print(
        Text.assemble(
            ("harmful (never trained)", "red"),
            "  ",
            ("control token", "bold"),
            "  ",
            ("trained", "green"),
            "  ",
            ("untrained", "dim"),
        )
    )
    for row in rows[:n]:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
        body = Text(_facts(row) + "\n", style="dim")
        body.append(prompt + "\n\n", style="cyan")
        if "segments" in row:
            body.append("assistant: ")
            body.append(segment_text(row["segments"]))
            body.append("\n\nvisible: ", style="bold")
            body.append(row["visible"])
        else:
            body.append("chosen: ", style="bold green")
            body.append(_tokens_bold(row["chosen"][0]["content"]))
            body.append("\n\nrejected: ", style="bold red")
            body.append(_tokens_bold(row["rejected"][0]["content"]))
        console.print(Panel(body, title=f"{row['kind']} {row['id']}", title_align="left"))

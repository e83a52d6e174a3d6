"""Spec references stay inside the checkout: code and docs cite docs/<file>.md#<anchor> sections
that exist, never design files a clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built from pieces so this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", "DESIGN" + " §", "FORMATS" + ".md")
REFERENCE = re.compile(r"docs/([\w.-]+?)\.md#([\w-]+)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def tracked_texts() -> dict[str, str]:
    """Every text file git tracks, by path (binary files left out)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of a Markdown file's headings (fenced code skipped)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if not m:
            continue
        text = re.sub(r"`([^`]*)`", r"\1", m.group(2))
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_no_tracked_file_cites_design_files_outside_the_checkout():
    bad = [
        f"{name}:{i}: {line.strip()}"
        for name, text in tracked_texts().items()
        for i, line in enumerate(text.splitlines(), 1)
        if any(s in line for s in OUTSIDE)
    ]
    assert not bad, "\n".join(bad)


def test_every_docs_anchor_reference_points_at_a_heading():
    texts = tracked_texts()
    cache: dict[str, set[str] | None] = {}
    bad, count = [], 0
    for name, text in texts.items():
        for i, line in enumerate(text.splitlines(), 1):
            for m in REFERENCE.finditer(line):
                count += 1
                doc, anchor = f"docs/{m.group(1)}.md", m.group(2)
                if doc not in cache:
                    path = ROOT / doc
                    cache[doc] = anchors(path.read_text("utf-8")) if path.is_file() else None
                if cache[doc] is None:
                    bad.append(f"{name}:{i}: {doc} does not exist")
                elif anchor not in cache[doc]:
                    bad.append(f"{name}:{i}: {doc} has no heading #{anchor}")
    assert count, "no docs/<file>.md#<anchor> reference found"
    assert not bad, "\n".join(bad)

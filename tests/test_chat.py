"""`retrace chat` and `retrace generate` on a tiny model trained to answer one prompt with a
backtrack: the transcript keeps the taken-back text struck through, the real terminal shows it
(tmux send-keys / capture-pane), and generate writes one JSONL row per turn."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from decode_fixtures import memorised_model
from typer.testing import CliRunner

from pipeline.chat import Transcript
from pipeline.cli import app
from pipeline.decode import Event, Update

ROOT = Path(__file__).resolve().parents[1]
USER = "Tell me about foxes."
TURN = "The fox bites.[BACKTRACK-HATE] bites.[REPLACE] naps."


@pytest.fixture(scope="module")
def fox_model(tmp_path_factory):
    return memorised_model(tmp_path_factory.mktemp("fox"), USER, TURN)


def test_transcript_strikes_taken_back_text_and_names_the_policy():
    view = Transcript()
    bt = Event("backtrack", 2, "[BACKTRACK-HATE]", "hate")
    rep = Event("replace", 4, "[REPLACE]", "hate", " bites.")
    for visible, events in [
        ("The fox", ()),
        ("The fox bites.", ()),
        ("The fox bites.", (bt,)),
        ("The fox bites.", ()),  # the copy is not shown
        ("The fox", (rep,)),
        ("The fox naps.", ()),
    ]:
        view.update(Update(0, "", visible, events))
    assert view.segments == [
        ["The fox", "text"],
        [" bites.", "struck"],
        ["↶ hate", "tag"],
        [" naps.", "text"],
    ]
    reset = Event("reset", 9, "[RESET]", None, "The fox naps.")
    view.update(Update(0, "", "", (reset,)))
    view.update(Update(0, "", "No.", ()))
    assert [k for _, k in view.segments] == ["struck", "struck", "tag", "struck", "tag", "text"]
    assert "".join(p for p, k in view.segments if k == "text") == "No."


def test_generate_writes_one_row_per_prompt(fox_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "fox", "prompt": USER})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": USER}], "seed": 5})
        + "\n"
    )
    out = tmp_path / "turns.jsonl"
    args = ["generate", "--model", str(fox_model), "--prompts", str(prompts), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--set", "decode.temperature=0"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["fox", "2"]
    assert all(r["visible"] == "The fox naps." and r["raw"] == TURN for r in rows)
    assert [e["kind"] for e in rows[0]["events"]] == ["backtrack", "replace"]
    assert rows[1]["seed"] == 5 and rows[0]["wasted_tokens"] > 0


def test_generate_bad_prompt_line_is_one_line_error(fox_model, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"text": "no prompt key"}\n')
    args = ["generate", "--model", str(fox_model), "--prompts", str(prompts)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"{prompts}:1: give exactly one of `prompt`" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_real_terminal_shows_the_struck_edit(fox_model, tmp_path):
    session = f"retrace-chat-{os.getpid()}"
    code = "from pipeline.cli import app; app()"
    command = [sys.executable, "-c", code, "chat", "--model", str(fox_model)]
    command += ["--set", "decode.temperature=0", "--show", "both"]
    env = f"PYTHONPATH={ROOT} OMP_NUM_THREADS=1 TERM=xterm-256color"
    shell = f"cd {ROOT} && env {env} " + " ".join(f"'{c}'" for c in command)
    tmux = ["tmux", "-L", session]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "30", shell])
    try:
        screen = _wait(tmux, session, "you>")
        subprocess.run([*tmux, "send-keys", "-t", session, USER, "Enter"], check=True)
        screen = _wait(tmux, session, "never shown")
        plain = re.sub(r"\x1b\[[0-9;]*m", "", screen)
        assert "The fox bites. ↶ hate  naps." in plain  # the struck text stays, tagged
        assert "raw: " + TURN in plain
        # " bites." is drawn struck through (SGR 9), the replacement is not.
        struck = re.search(r"((?:\x1b\[[0-9;]*m)+) bites\.", screen)
        assert struck and re.search(r"\[(?:[0-9;]*;)?9[;m]", struck.group(1)), screen
        after = re.search(r"((?:\x1b\[[0-9;]*m)+) naps\.", screen)
        assert after and not re.search(r"\[(?:[0-9;]*;)?9[;m]", after.group(1))
        subprocess.run([*tmux, "send-keys", "-t", session, "/quit", "Enter"], check=True)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)


def _wait(tmux: list[str], session: str, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = subprocess.run(
            [*tmux, "capture-pane", "-p", "-e", "-t", session],
            capture_output=True,
            text=True,
        ).stdout
        if text in re.sub(r"\x1b\[[0-9;]*m", "", screen):
            return screen
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{screen}")

"""The Makefile's test targets: `make test` is the whole suite (CI runs it), `make test-fast`
leaves out the `slow` marker."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands(target: str) -> list[str]:
    # -n prints the commands without running them; VENV points at a folder that needs nothing.
    done = subprocess.run(
        ["make", "-n", "-s", target, "VENV=/nonexistent-venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [ln for ln in done.stdout.splitlines() if "pytest" in ln]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_test_fast_deselects_slow_and_test_runs_everything():
    (fast,) = _commands("test-fast")
    assert '-m "not slow"' in fast
    (full,) = _commands("test")
    assert " -m " not in full

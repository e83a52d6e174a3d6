"""The CLI's failure paths: a mistake or an environment failure is one clear line (or one line
per bad key) and a non-zero exit; a bug keeps its traceback."""

from __future__ import annotations

import errno

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import _friendly, app
from pipeline.dag import StageError

runner = CliRunner()


def test_unknown_key_exits_2_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  temprature: 1.5\nfilter:\n  min_words: lots\n")
    result = runner.invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.stderr
    assert "sample.temprature: unknown key" in result.stderr
    assert "filter.min_words" in result.stderr
    assert "Traceback" not in result.output


def test_bad_override_is_named(tmp_path):
    result = runner.invoke(app, ["status", "--set", "sample.n=two"])
    assert result.exit_code == 2 and "sample.n" in result.stderr


def test_unknown_stage_lists_the_stages():
    result = runner.invoke(app, ["stage", "smaple"])
    assert result.exit_code == 1
    assert "unknown stage 'smaple'" in result.stderr and "sample" in result.stderr


def test_missing_config_file_says_so(tmp_path):
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_show_before_format_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["show", "--set", f"run.runs_dir={tmp_path}"])
    assert result.exit_code == 1 and "retrace stage format" in result.stderr


def test_every_shipped_config_validates():
    from pathlib import Path

    from pipeline import config
    from pipeline.dag import load_stages

    stages = load_stages()
    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"default.yaml", "paper.yaml"}
    for path in files:
        config.load(path, stages)


def test_force_with_an_unknown_stage_names_the_stages(tmp_path):
    result = runner.invoke(app, ["run", "--force", "smaple", "--set", f"run.runs_dir={tmp_path}"])
    assert result.exit_code == 1
    assert "unknown stage 'smaple'; stages: sources, sample" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any work


def test_an_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = runner.invoke(app, ["run", "--config", str(empty)])
    assert result.exit_code == 2 and f"{empty} is empty" in result.stderr


def test_run_name_outside_runs_dir_is_refused(tmp_path):
    result = runner.invoke(app, ["status", "--set", "run.name=../../etc"])
    assert result.exit_code == 2 and "run.name" in result.stderr


# --- which failures are one line -----------------------------------------------------------------


def _invoke(error: BaseException):
    def command():
        raise error

    return _friendly(command)


@pytest.mark.parametrize(
    "error,line",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/sample"),
            "No space left on device: /data/runs/x/sample; free space there",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/runs"),
            "Read-only file system: /ro/runs; that file system is read-only",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/root/runs"),
            "Permission denied: /root/runs; you lack permission there",
        ),
        (MemoryError(), "out of memory; lower the batch or chunk size"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.jsonl"),
            "No such file or directory: data/x.jsonl; check the path",
        ),
        (StageError("stage filter rejected 4 of 4 input rows"), "stage filter rejected 4 of 4"),
        (
            ModuleNotFoundError("No module named 'vllm'", name="vllm"),
            "No module named 'vllm'",
        ),
    ],
)
def test_mistakes_and_environment_failures_print_one_line(capsys, error, line):
    with pytest.raises(typer.Exit) as exit_:
        _invoke(error)()
    err = capsys.readouterr().err
    assert exit_.value.exit_code == 1 and line in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_failing_stage_and_chunk_are_on_the_line(capsys):
    error = StageError("stage sample: output samples: column 'seed' is missing")
    error.add_note("in stage sample, chunk 3")
    with pytest.raises(typer.Exit):
        _invoke(error)()
    assert "(in stage sample, chunk 3)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        KeyError("response"),
        TypeError("unsupported operand"),
        ValueError("bad"),
        OSError(errno.EIO, "Input/output error"),
        ImportError("cannot import name 'x' from 'pipeline.records'", name="pipeline.records"),
    ],
)
def test_a_bug_keeps_its_traceback(error):
    with pytest.raises(type(error)):
        _invoke(error)()

"""The CLI's failure paths: one clear line (or one line per bad key), a non-zero exit, no
traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from pipeline.cli import app

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

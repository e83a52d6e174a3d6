"""`retrace eval` on the command line: a named model into its own folder, a clear refusal for a
model without control tokens, and `--compare` over two eval folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from decode_fixtures import control_model
from trainer_fixtures import one_thread
from typer.testing import CliRunner

from pipeline.cli import app

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
runner = CliRunner()

TINY = [
    "--suite", "prefill",
    "--set", "eval.prefill.n=1", "--set", "eval.prefill.ks=[0,5]",
    "--set", "eval.prefill.sampling.max_new_tokens=4", "--set", "eval.judges=[{kind: keyword}]",
]  # fmt: skip


def _eval(tmp_path: Path, model: Path, *extra: str):
    runs = ["--set", f"run.runs_dir={tmp_path / 'runs'}", "--set", "run.name=cli"]
    return runner.invoke(app, ["eval", "--model", str(model), *TINY, *runs, *extra])


def test_eval_then_compare(tmp_path, tiny_model_dir):
    trained = control_model(tmp_path / "with-controls", sliding_window=64)
    result = _eval(tmp_path, trained, "--decode", "context=drop")
    assert result.exit_code == 0, result.output
    report = Path(result.stdout.strip())
    assert report == tmp_path / "runs" / "cli" / "eval" / "with-controls" / "files" / "report.md"
    assert "| prefill | k=5 | asr_visible | keyword |" in report.read_text()

    refused = _eval(tmp_path, tiny_model_dir)
    assert refused.exit_code == 1 and "no control tokens" in refused.stderr
    assert "Traceback" not in refused.output
    baseline = _eval(tmp_path, tiny_model_dir, "--baseline")
    assert baseline.exit_code == 0, baseline.output

    folders = [str(Path(baseline.stdout.strip()).parents[1]), str(report.parents[1])]
    out = tmp_path / "cmp"
    compared = runner.invoke(app, ["eval", "--compare", *folders, "--out", str(out)])
    assert compared.exit_code == 0, compared.output
    header = compared.stdout.splitlines()[0]
    assert "with-controls" in header and Path(folders[0]).name in header
    assert (out / "compare.md").is_file() and (out / "compare_asr_vs_k.png").is_file()


def test_compare_needs_two_folders(tmp_path):
    result = runner.invoke(app, ["eval", "--compare", str(tmp_path)])
    assert result.exit_code == 1 and "two or more" in result.stderr

"""The CLI's failure paths: a mistake or an environment failure is one clear line (or one line
per bad key) and a non-zero exit; a bug keeps its traceback."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

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
    from pipeline import config
    from pipeline.cli import load_stages

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


# --- inputs to generate and eval ----------------------------------------------------------------


def _one_line_failure(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize(
    "content,needle",
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\xfe",
            "is not a JSON Lines file (line 1: not",
        ),
        (b'{"prompt": 5}\n', ":1: `prompt`: Input should be a valid string (got 5)"),
        (b'{"prompt": "Hi", "seed": "abc"}\n', ":1: `seed`: Input should be a valid integer"),
        (b'{"id": "x"}\n', ":1: give exactly one of `prompt` (text) or `messages`"),
        (b'{"prompt": null}\n', ":1: give exactly one of `prompt` (text) or `messages`"),
        (b'{"messages": [{"role": "user", "content": null}]}\n', "`messages.0.content`"),
        (b'{"prompt": "Hi", "prefill": ["x"]}\n', "`prefill`: Input should be a valid string"),
    ],
)
def test_generate_refuses_a_file_without_a_usable_prompt_in_one_line(tmp_path, content, needle):
    """Each of these once decoded a null or non-text message, or died in a traceback."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    # The file is checked before any model loads: this model would fail if it got that far.
    result = runner.invoke(app, ["generate", "--prompts", str(prompts), "--model", "./nowhere"])
    _one_line_failure(result, str(prompts), needle, "no line of")


def test_generate_rejects_bad_lines_by_number_and_decodes_the_rest(tmp_path, control_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        '{"id": "a", "prompt": "Hi"}',
        '{"prompt": 5}',
        "not json",
        '{"id": "b", "prompt": "Yo"}',
    ]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "turns.jsonl"
    args = ["generate", "--prompts", str(prompts), "--model", str(control_model_dir)]
    result = runner.invoke(app, [*args, "--out", str(out), "--set", "decode.max_new_tokens=2"])
    assert result.exit_code == 0, result.output
    assert [json.loads(r)["id"] for r in out.read_text().splitlines()] == ["a", "b"]
    assert f"rejected {prompts}:2 (bad_field): `prompt`: Input should be a valid string" in (
        result.stderr
    )
    assert f"rejected {prompts}:3 (malformed_line): not JSON" in result.stderr
    assert "2 line(s) of" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("model", ["./no-such-ckpt", "/no/such/ckpt", "runs/x/train/files/final"])
def test_a_model_path_that_does_not_exist_is_one_line_not_a_hub_lookup(tmp_path, model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    result = runner.invoke(app, ["generate", "--prompts", str(prompts), "--model", model])
    _one_line_failure(result, f"model {model}: no such folder", "'embedded' or a Hub id")


def test_a_model_path_whose_first_folder_exists_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n')
    args = ["generate", "--prompts", "prompts.jsonl", "--model", "ckpts/final"]
    _one_line_failure(runner.invoke(app, args), "model ckpts/final: no such folder")


def truncated_copy(model_dir: Path, to: Path, keep: int) -> Path:
    """A copy of a model folder with its model.safetensors cut to `keep` bytes (negative: that
    many bytes short), as a full disk or a killed copy leaves it."""
    shutil.copytree(model_dir, to)
    weights = to / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    return to


@pytest.mark.parametrize("keep", [-100, 6, 50])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, control_model_dir, keep):
    torn = truncated_copy(control_model_dir, tmp_path / "torn", keep)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    result = runner.invoke(app, ["generate", "--prompts", str(prompts), "--model", str(torn)])
    _one_line_failure(result, f"model folder {torn}: model.safetensors is truncated or corrupt")


@pytest.mark.parametrize(
    "key",
    ["filter.scorer.batch_size", "sample.generator.batch_size", "rewrite.generator.batch_size"],
)
def test_a_batch_size_of_zero_fails_at_config_time_naming_the_key(key):
    result = runner.invoke(app, ["status", "--set", f"{key}=0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{key}: Input should be greater than or equal to 1" in result.stderr

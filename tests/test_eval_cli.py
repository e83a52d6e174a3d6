"""`retrace eval` on the command line: a named model into its own folder (one per decoding), a
clear refusal for a model without control tokens, `--compare` over two eval folders, and the one
`decode:` section that chat, generate and eval read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from decode_fixtures import control_model
from trainer_fixtures import one_thread
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.decode import DecodeConfig
from stages import eval_model
from stages.eval_report import parse_table

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
    result = _eval(tmp_path, trained, "--set", "decode.context=drop")
    assert result.exit_code == 0, result.output
    report = Path(result.stdout.strip())
    # with-controls-<hash of its path>-decode-<hash of context=drop>
    folder = eval_model.slug(str(trained), None, DecodeConfig(context="drop"))
    assert folder.startswith("with-controls-")
    assert report == tmp_path / "runs" / "cli" / "eval" / folder / "files" / "report.md"
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


def test_two_evals_of_same_named_models_both_survive(tmp_path):
    """`…/ctrlE` and `…/k/ctrlE` (as every `train/files/final`) once shared one eval folder: the
    second eval replaced the first's generations, results and report."""
    first = control_model(tmp_path / "a" / "ctrlE", sliding_window=64)
    second = control_model(tmp_path / "b" / "k" / "ctrlE", sliding_window=64, seed=1)
    reports = []
    for model in (first, second):
        result = _eval(tmp_path, model)
        assert result.exit_code == 0, result.output
        reports.append(Path(result.stdout.strip()))
    kept = reports[0].read_bytes()
    folders = [r.parents[1] for r in reports]
    assert folders[0] != folders[1] and all(f.name.startswith("ctrlE-") for f in folders)
    assert reports[0].read_bytes() == kept  # the second eval left the first's report alone
    for folder, model in zip(folders, (first, second), strict=True):
        results = json.loads((folder / "files" / "results.json").read_text())
        assert {r["model"] for r in results["results"]} == {folder.name}
        assert results["model"] == folder.name and results["source"] == str(model)
        assert (folder / "generations").is_dir() and (folder / "_manifest.json").is_file()
    again = _eval(tmp_path, first)  # the same model keeps its folder: a rerun is cached
    assert again.exit_code == 0 and Path(again.stdout.strip()) == reports[0]
    assert "eval: cached" in again.stderr


@pytest.mark.parametrize("case", ["binary prompts", "no such model", "truncated weights"])
def test_a_bad_eval_input_is_one_line_not_a_traceback(tmp_path, control_model_dir, case):
    model, extra = control_model_dir, []
    if case == "binary prompts":
        prompts = tmp_path / "borderline.jsonl"
        prompts.write_bytes(b"\x00\x01\xff\xfe\x00binary\x00")
        extra = ["--suite", "benign", "--set", f"eval.benign.prompts.path={prompts}"]
        needle = f"{prompts} is not a JSON Lines file"
    elif case == "no such model":
        model = tmp_path / "runs" / "old" / "train" / "files" / "final"
        needle = f"model {model}: no such folder"
    else:
        model = tmp_path / "torn"
        shutil.copytree(control_model_dir, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
        needle = f"model folder {model}: model.safetensors is truncated or corrupt"
    result = _eval(tmp_path, model, *extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    # Progress lines aside (the stage's, the weights' bar), one line says what went wrong.
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert needle in error, result.stderr


def test_a_keep_and_a_drop_eval_of_one_model_sit_side_by_side(tmp_path):
    """`--set decode.context=drop` once reached chat and generate but left eval on `keep`, and two
    evals of one model shared one folder whatever their decoding."""
    model = control_model(tmp_path / "ctrlE", sliding_window=64)
    reports = {}
    for context in ("keep", "drop"):
        result = _eval(tmp_path, model, "--set", f"decode.context={context}")
        assert result.exit_code == 0, result.output
        reports[context] = Path(result.stdout.strip())
    keep, drop = (reports[c].parents[1] for c in ("keep", "drop"))
    assert keep.name == eval_model.slug(str(model))  # the default's folder keeps its name
    assert drop.name == f"{keep.name}-decode-" + drop.name.rsplit("-", 1)[1] and keep != drop
    assert reports["keep"].is_file() and reports["drop"].is_file()  # both survive
    for folder, decoding in ((keep, "default"), (drop, "context=drop")):
        rows = parse_table(reports["keep" if folder == keep else "drop"].read_text())
        assert rows and {r["decode"] for r in rows} == {decoding}  # the table says which is which
        data = json.loads((folder / "files" / "results.json").read_text())
        assert data["decode_setting"] == decoding
        assert {r["decode"] for r in data["results"]} == {decoding}
        assert data["model"] == keep.name  # one model, two decodings
    compared = runner.invoke(
        app, ["eval", "--compare", str(keep), str(drop), "--out", str(tmp_path)]
    )
    assert compared.exit_code == 0, compared.output
    header = compared.stdout.splitlines()[0]
    assert f"| {keep.name} |" in header and f"| {keep.name} [context=drop] |" in header


def test_set_decode_context_drop_reaches_chat_generate_and_eval(tmp_path, monkeypatch):
    """The decoder each command builds, recorded as it is built (the real one, then used)."""
    import pipeline.decode as decode_pkg
    from stages import eval_run

    model = control_model(tmp_path / "m", sliding_window=64)
    built: dict[str, list[str]] = {}

    def recording(where, real):
        def build(*args, **kwargs):
            decoder = real(*args, **kwargs)
            built.setdefault(where, []).append(decoder.cfg.context)
            return decoder

        return build

    drop = ["--set", "decode.context=drop"]
    monkeypatch.setattr(decode_pkg, "load_decoder", recording("cli", decode_pkg.load_decoder))
    chat = runner.invoke(app, ["chat", "--model", str(model), *drop], input="/quit\n")
    assert chat.exit_code == 0, chat.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    args = [
        "generate",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o"),
    ]
    generated = runner.invoke(app, [*args, *drop, "--set", "decode.max_new_tokens=2"])
    assert generated.exit_code == 0, generated.output
    assert built.pop("cli") == ["drop", "drop"]  # chat, then generate
    monkeypatch.setattr(eval_run, "_decoder", recording("eval", eval_run._decoder))
    result = _eval(tmp_path, model, *drop)
    assert result.exit_code == 0, result.output
    assert built["eval"] and set(built["eval"]) == {"drop"}


def test_an_old_eval_decode_key_or_decode_option_fails_in_one_line(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("eval:\n  decode: {context: drop}\n")
    for args in (["eval", "--config", str(config)], ["eval", "--set", "eval.decode.context=drop"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        [line] = result.stderr.strip().splitlines()
        assert "eval.decode is not a setting; move it to the top-level `decode:` section" in line
    result = runner.invoke(app, ["eval", "--decode", "context=drop"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "--decode context=drop was removed: use --set decode.context=drop" in line


def test_a_suite_sampling_key_overrides_only_itself_and_null_is_decodes():
    """A suite's `sampling` is a declared override of `decode:`: `--set` of one key once reset the
    rest to another suite's values (midstream's greedy became T=0.9); now it keeps the protocol."""
    from pipeline import config as config_mod
    from pipeline.cli import load_stages

    sets = ["eval.midstream.sampling.max_new_tokens=8", "eval.prefill.sampling.top_p=null"]
    cfg = config_mod.load(None, load_stages(), [*sets, "decode.top_p=0.8"])
    assert cfg.eval.midstream.sampling.temperature == 0.0  # midstream's greedy protocol stays
    assert cfg.eval.midstream.sampling.max_new_tokens == 8
    assert cfg.eval.prefill.sampling.over(cfg.eval.decode).top_p == 0.8  # null: decode's value
    with pytest.raises(config_mod.ConfigError, match="eval.decoding.temperatures.0"):
        config_mod.load(None, load_stages(), ["eval.decoding.temperatures=[-1]"])

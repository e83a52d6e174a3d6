"""Whole training runs on tiny data: exact resume, the stage wrapper, and a learning test."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import corpus, one_thread

from pipeline.env import LocalEnv
from stages import train as stage
from trainer import tokens
from trainer.config import TrainConfig
from trainer.train import train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _steps(out) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize(
    "objective, pack", [("sft", True), ("constrained", False), ("controlled", True)]
)
def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, objective, pack):
    folder = corpus(tmp_path / "data", {"bsafe": 8, "reset": 6, "recovery": 6}, validation=4)
    cfg = TrainConfig(
        model=str(tiny_model_dir), objective=objective, pack=pack, steps=6, batch_size=4,
        buffer_rows=16, shuffle_buffer=8, save_every=2, eval_rows=4, warmup_steps=2,
    )  # fmt: skip
    train(cfg, folder, tmp_path / "full", log=lambda _: None)
    train(cfg, folder, tmp_path / "cut", stop_after=3, log=lambda _: None)  # saves at 3
    assert [r["step"] for r in _steps(tmp_path / "cut")] == [1, 2, 3]
    train(cfg, folder, tmp_path / "cut", log=lambda _: None)
    full, cut = _steps(tmp_path / "full"), _steps(tmp_path / "cut")
    assert len({r["epoch"] for r in full}) > 1  # the run crosses an epoch boundary
    for a, b in zip(full, cut, strict=True):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (
            b["step"], b["loss"], b["grad_norm"], b["lr"]
        )  # fmt: skip


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir):
    folder = corpus(tmp_path / "data", {"utility": 8}, validation=0)
    cfg = TrainConfig(model=str(tiny_model_dir), steps=4, batch_size=4, eval_rows=0)
    train(cfg, folder, tmp_path / "out", stop_after=1, log=lambda _: None)
    with pytest.raises(RuntimeError, match=r"different train\.lr"):
        train(cfg.model_copy(update={"lr": 1.0}), folder, tmp_path / "out", log=lambda _: None)


def test_stage_trains_into_its_workdir(tmp_path, tiny_model_dir):
    folder = corpus(tmp_path / "data", {"utility": 8}, validation=2)
    cfg = stage.Config(model="random:tiny", tokenizer=str(tiny_model_dir), steps=2, batch_size=4)
    out = stage.run({"publish.files": folder}, cfg, LocalEnv(workdir=tmp_path / "work"))
    assert out["rejected"].num_rows == 0
    final = tmp_path / "work" / "final"
    tok = tokens.load_tokenizer(str(final))
    assert set(tokens.control_tokens()) <= set(tok.all_special_tokens)
    assert stage.SPEC.reads == ("publish.files",) and not stage.SPEC.writes


def test_retrace_train_data_b_after_a_trains_b_from_scratch(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from pipeline.cli import app

    a = corpus(tmp_path / "a", {"utility": 8}, seed=1, validation=0)
    b = corpus(tmp_path / "b", {"bsafe": 8}, seed=2, validation=0)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run: {{runs_dir: {tmp_path / 'runs'}, name: t}}\n"
        f"train: {{model: {tiny_model_dir}, steps: 3, batch_size: 2, eval_rows: 0}}\n"
    )
    stage_dir = tmp_path / "runs" / "t" / "train"
    runner = CliRunner()

    def retrace_train(folder):
        result = runner.invoke(app, ["train", "--config", str(config), "--data", str(folder)])
        assert result.exit_code == 0, result.output
        return result.output, json.loads((stage_dir / "_manifest.json").read_text())

    _, first = retrace_train(a)  # through the engine: a manifest and a cache key
    out, second = retrace_train(b)
    assert first["key"] != second["key"] and "train: running" in out
    steps = _steps(stage_dir / "files")
    assert [r["step"] for r in steps] == [1, 2, 3]  # B from step 1, not A's finished run
    assert all(set(r["rows"]) == {"bsafe"} for r in steps)  # and on B's rows only
    out, third = retrace_train(b)
    assert "train: cached" in out and third["key"] == second["key"]


def test_a_checkpoint_folder_refuses_other_data_and_a_second_training(tmp_path, tiny_model_dir):
    import fcntl

    a = corpus(tmp_path / "a", {"utility": 8}, seed=1, validation=0)
    b = corpus(tmp_path / "b", {"utility": 8}, seed=2, validation=0)
    cfg = TrainConfig(model=str(tiny_model_dir), steps=4, batch_size=4, eval_rows=0)
    train(cfg, a, tmp_path / "out", stop_after=2, log=lambda _: None)
    with pytest.raises(RuntimeError, match="trained on other data"):
        train(cfg, b, tmp_path / "out", log=lambda _: None)
    with open(tmp_path / "out" / ".train.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a training running elsewhere
        with pytest.raises(RuntimeError, match="another training is writing"):
            train(cfg, a, tmp_path / "out", log=lambda _: None)


def test_python_m_trainer_train_takes_the_engines_overrides(tmp_path, tiny_model_dir):
    from trainer.train import main

    folder = corpus(tmp_path / "data", {"utility": 4}, validation=0)
    args = [
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--set",
        f"model={tiny_model_dir}",
    ]
    with pytest.raises(SystemExit, match=r"train\.lr: .*must be > 0"):
        main([*args, "--set", "train.lr=-1"])
    main([*args, "--set", "steps=1", "--set", "train.eval_rows=0", "--set", "batch_size=2"])
    assert [r["step"] for r in _steps(tmp_path / "out")] == [1]


def _cut_safetensors(step_dir):
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a kill mid-write


def _garble_state(step_dir):
    (step_dir / "trainer_state.pt").write_bytes(b"\x80\x04garbage, not a pickle" * 10)


@pytest.mark.parametrize("damage", [_cut_safetensors, _garble_state], ids=["weights", "state"])
def test_a_torn_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model_dir, damage):
    # issue 21 item 10: the latest checkpoint unreadable, the earlier one still there -> one
    # warning line, resume from the earlier one, and the run ends as an uninterrupted one does
    folder = corpus(tmp_path / "data", {"bsafe": 8, "reset": 6}, validation=0)
    cfg = TrainConfig(
        model=str(tiny_model_dir), steps=6, batch_size=4, buffer_rows=16, shuffle_buffer=8,
        save_every=2, eval_rows=0, warmup_steps=2,
    )  # fmt: skip
    train(cfg, folder, tmp_path / "full", log=lambda _: None)
    out = tmp_path / "cut"
    train(cfg, folder, out, stop_after=4, log=lambda _: None)
    step2, step4 = out / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000004"
    assert step2.is_dir() and step4.is_dir()
    damage(step4)
    lines: list[str] = []
    final = train(cfg, folder, out, log=lines.append)
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step-0000004 cannot be loaded" in warnings[0]
    assert any(ln.startswith(f"resuming from {step2} (step 2)") for ln in lines)
    assert final == out / "final" and (final / "model.safetensors").is_file()
    full, cut = _steps(tmp_path / "full"), _steps(out)
    assert [(r["step"], r["loss"]) for r in cut] == [(r["step"], r["loss"]) for r in full]
    assert (out / "checkpoints" / "corrupt-step-0000004").is_dir()  # kept aside, never resumed


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, tiny_model_dir):
    folder = corpus(tmp_path / "data", {"utility": 8}, validation=0)
    cfg = TrainConfig(model=str(tiny_model_dir), steps=4, batch_size=4, eval_rows=0)
    out = tmp_path / "out"
    train(cfg, folder, out, stop_after=2, log=lambda _: None)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # killed mid-write of step 3's record
    lines: list[str] = []
    train(cfg, folder, out, log=lines.append)
    assert sum(ln.startswith("warning: dropped 1 torn line") for ln in lines) == 1
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4]

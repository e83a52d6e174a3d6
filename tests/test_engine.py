"""The engine on two toy stages: config errors, cache keys, --force, resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fakestages import STAGES

from pipeline import config as config_mod
from pipeline.dag import Pipeline, StageError

ROOT = Path(__file__).resolve().parents[1]


def make(tmp_path: Path, overrides=(), text: str | None = None) -> Pipeline:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(text or f"run:\n  runs_dir: {tmp_path}/runs\n  chunk_size: 4\n")
    return Pipeline(config_mod.load(cfg_file, STAGES, list(overrides)), STAGES)


def squares(pipe: Pipeline) -> list[int]:
    return sorted(pipe.store.read("square", "squares").column("square").to_pylist())


def expected(start=0, count=20, offset=0) -> list[int]:
    return sorted(v * v + offset for v in range(start, start + count) if v % 7)


# --- config -------------------------------------------------------------------------------------


def test_unknown_key_fails_naming_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("square:\n  ofset: 3\n")
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(bad, STAGES)
    assert str(bad) in str(err.value) and "square.ofset: unknown key" in str(err.value)


def test_wrong_type_fails_naming_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: many\nnumbers:\n  count: -x\n")
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(bad, STAGES)
    text = str(err.value)
    assert "run.seed" in text and "numbers.count" in text and "2 invalid" in text


def test_unknown_section_and_bad_override(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="sampel: unknown key"):
        config_mod.load(None, STAGES, ["sampel.x=1"])
    with pytest.raises(config_mod.ConfigError, match="expected section.key=value"):
        config_mod.load(None, STAGES, ["numbers.count"])
    cfg = config_mod.load(None, STAGES, ["numbers.count=5", "run.name=x"])
    assert cfg.numbers.count == 5 and cfg.run.name == "x"


# --- cache --------------------------------------------------------------------------------------


def test_cache_skips_then_invalidates_on_config_and_input(tmp_path):
    pipe = make(tmp_path)
    assert pipe.run(["square"]) == {"numbers": "ran", "square": "ran"}
    assert squares(pipe) == expected()
    assert make(tmp_path).run(["square"]) == {"numbers": "cached", "square": "cached"}
    # Its own config changed: only square reruns.
    pipe = make(tmp_path, ["square.offset=1"])
    assert pipe.run(["square"]) == {"numbers": "cached", "square": "ran"}
    assert squares(pipe) == expected(offset=1)
    # Its input changed: square reruns because the input's content hash changed.
    pipe = make(tmp_path, ["square.offset=1", "numbers.count=10"])
    assert pipe.run(["square"]) == {"numbers": "ran", "square": "ran"}
    assert squares(pipe) == expected(count=10, offset=1)


def test_failure_bound_is_not_part_of_the_key(tmp_path):
    make(tmp_path).run(["square"])
    pipe = make(tmp_path, ["square.max_rejected_share=0.9"])
    assert pipe.run(["square"])["square"] == "cached"


def test_force_reruns_stage_and_dependents(tmp_path):
    make(tmp_path).run(["square"])
    assert make(tmp_path).run(["square"], force={"numbers"}) == {"numbers": "ran", "square": "ran"}
    assert make(tmp_path).run(["square"], force={"square"}) == {
        "numbers": "cached",
        "square": "ran",
    }


def test_status_reports_fresh_stale_missing(tmp_path):
    pipe = make(tmp_path)
    assert [pipe.status(s) for s in STAGES] == ["missing", "missing"]
    pipe.run(["numbers"])
    assert [pipe.status(s) for s in STAGES] == ["fresh", "missing"]
    pipe.run(["square"])
    assert [make(tmp_path, ["square.offset=2"]).status(s) for s in STAGES] == ["fresh", "stale"]
    assert [make(tmp_path, ["numbers.count=3"]).status(s) for s in STAGES] == ["stale", "stale"]


def test_manifest_records_counts_reasons_and_versions(tmp_path):
    pipe = make(tmp_path)
    pipe.run(["square"])
    manifest = json.loads((pipe.store.stage_dir("square") / "_manifest.json").read_text())
    assert manifest["rows_in"] == {"numbers.values": 20}
    assert manifest["rows_out"] == {"squares": 17}
    assert manifest["rejected_by_reason"] == {"multiple_of_seven": 3}
    assert manifest["seed"] == 0 and "pyarrow" in manifest["versions"]
    assert set(manifest["key_parts"]) >= {"config", "inputs", "code", "prompts", "models"}
    rejected = pipe.store.read("square", "rejected").to_pylist()
    assert {r["id"] for r in rejected} == {"n0", "n7", "n14"}
    assert all(r["reason"] == "multiple_of_seven" for r in rejected)


def test_rejected_share_over_bound_fails_with_one_clear_message(tmp_path):
    pipe = make(tmp_path, ["square.max_rejected_share=0.1"])
    with pytest.raises(StageError) as err:
        pipe.run(["square"])
    msg = str(err.value)
    assert "rejected 3 of 20" in msg and "multiple_of_seven 3" in msg
    assert "square.max_rejected_share" in msg
    assert pipe.store.manifest("square") is None


# --- resume -------------------------------------------------------------------------------------

_CHILD = """
import sys
from fakestages import STAGES
from pipeline import config
from pipeline.dag import Pipeline
Pipeline(config.load(sys.argv[1], STAGES), STAGES).run(["square"])
"""


def test_killed_stage_resumes_without_losing_or_duplicating_rows(tmp_path):
    pipe = make(tmp_path)  # writes cfg.yaml; chunks of 4 values: 0-3, 4-7, 8-11, ...
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
        "RETRACE_TEST_KILL_AT": "12",  # dies before returning the 4th chunk
        "RETRACE_TEST_LOG": str(log),
    }
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "cfg.yaml")], env=env, capture_output=True
    )
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    assert log.read_text().splitlines() == ["0,1,2,3", "4,5,6,7", "8,9,10,11"]
    assert pipe.status("square") == "partial" and pipe.store.manifest("square") is None

    os.environ["RETRACE_TEST_LOG"] = str(log)
    try:
        assert pipe.run(["square"]) == {"numbers": "cached", "square": "ran"}
    finally:
        del os.environ["RETRACE_TEST_LOG"]
    # Only the unfinished chunks ran again, and every row is there exactly once.
    assert log.read_text().splitlines()[3:] == ["12,13,14,15", "16,17,18,19"]
    ids = pipe.store.read("square", "squares").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 17
    assert squares(pipe) == expected()
    assert pipe.store.manifest("square")["rows_in"] == {"numbers.values": 20}


def test_no_half_written_files_under_final_names(tmp_path):
    pipe = make(tmp_path)
    pipe.run(["square"])
    folder = pipe.store.stage_dir("square")
    assert not list(folder.rglob(".*tmp*")) and not list(folder.glob(".work-*"))
    for part in (folder / "squares").glob("*.parquet"):
        pq.read_metadata(part)  # every part is a complete Parquet file


def test_same_config_same_bytes(tmp_path):
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    a.run(["square"]), b.run(["square"])
    sha = [p.store.manifest("square")["outputs"]["squares"]["sha256"] for p in (a, b)]
    assert sha[0] == sha[1]


def test_a_second_process_on_the_same_stage_is_refused(tmp_path):
    pipe = make(tmp_path)
    with pipe.store.lock("numbers"):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path / "cfg.yaml")],
            env={**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"},
            capture_output=True,
            text=True,
        )
    assert child.returncode != 0
    assert "another retrace process is running stage numbers" in child.stderr


def test_a_stage_can_add_model_fingerprints_to_its_key(tmp_path, monkeypatch):
    from fakestages import square

    pipe = make(tmp_path)
    pipe.run(["square"])
    monkeypatch.setattr(square, "fingerprints", lambda cfg: [{"tokenizer": "v2"}], raising=False)
    assert make(tmp_path).status("square") == "stale"
    assert make(tmp_path).key("square")[1]["models"] == [{"tokenizer": "v2"}]

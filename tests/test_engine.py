"""The engine on toy stages: config errors, cache keys, --force, resume after a kill, finalize under
SIGKILL, one writer per run, code and model identity, empty inputs, the stage contract."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakestages import STAGES, numbers, square
from pydantic import BaseModel, ConfigDict

from pipeline import config as config_mod
from pipeline import records
from pipeline.cli import load_stages
from pipeline.dag import EXECUTORS, PROJECT_ROOT, Pipeline, StageError, import_closure
from pipeline.executor import run_chunk
from pipeline.stage import StageSpec

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}


def make(tmp_path: Path, overrides=(), text: str | None = None) -> Pipeline:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(text or f"run:\n  runs_dir: {tmp_path}/runs\n  chunk_size: 4\n")
    return Pipeline(config_mod.load(cfg_file, STAGES, list(overrides)), STAGES)


def status(pipe: Pipeline) -> list[str]:
    return list(pipe.statuses(list(STAGES)).values())


def squares(pipe: Pipeline) -> list[int]:
    return sorted(pipe.store.read("square", "squares").column("square").to_pylist())


def expected(start=0, count=20, offset=0) -> list[int]:
    return sorted(v * v + offset for v in range(start, start + count) if v % 7)


def run_child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env or CHILD_ENV, capture_output=True, text=True
    )


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


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_an_error_not_a_default_run(tmp_path, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(config_mod.ConfigError, match=f"{empty} is empty"):
        config_mod.load(empty, STAGES)


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/abs", "a/b", "..", ".hidden", ""])
def test_run_name_cannot_escape_runs_dir(name):
    with pytest.raises(config_mod.ConfigError, match="run.name: Value error, must be one folder"):
        config_mod.load(None, STAGES, [f"run.name='{name}'"])


@pytest.mark.parametrize(
    "override",
    [
        "sample.n=0",
        "sample.temperature=-1",
        "sample.top_p=0",
        "sample.top_p=1.5",
        "sample.top_k=-1",
        "sample.max_new_tokens=0",
        "sample.chunk_size=0",
        "filter.min_words=-1",
        "filter.threshold=1.5",
        "filter.max_rejected_share=2",
    ],
)
def test_each_bad_expensive_setting_fails_at_config_time_naming_the_key(override):
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(None, load_stages(), [override])
    assert override.split("=")[0] + ":" in str(err.value)


def test_filter_word_bounds_must_be_ordered():
    with pytest.raises(config_mod.ConfigError, match="min_words .50. is above max_words .10."):
        config_mod.load(None, load_stages(), ["filter.min_words=50", "filter.max_words=10"])


def test_force_with_an_unknown_or_unreached_stage_fails_naming_stages(tmp_path):
    pipe = make(tmp_path)
    with pytest.raises(StageError, match="unknown stage 'sqaure'; stages: numbers, square, report"):
        pipe.run(["square"], force={"sqaure"})
    with pytest.raises(StageError, match="--force report: not a stage this run reaches"):
        pipe.run(["square"], force={"report"})
    assert pipe.store.manifest("numbers") is None  # nothing ran


def test_ray_stage_names_are_checked_against_the_stages_the_engine_is_handed():
    # The executor imports no stage: the names come with the stages the config is validated for.
    cfg = config_mod.validate({"run": {"ray": {"stages": {"square": {"actors": 2}}}}}, STAGES)
    assert cfg.run.ray.stages["square"].actors == 2
    with pytest.raises(config_mod.ConfigError, match="unknown stage.s. sample; stages: numbers"):
        config_mod.validate({"run": {"ray": {"stages": {"sample": {}}}}}, STAGES)


def test_a_non_stage_section_can_be_registered(monkeypatch):
    class Decode(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        strength: float = 1.0

    monkeypatch.setitem(config_mod.SECTIONS, "decode", Decode)
    cfg = config_mod.load(None, STAGES, ["decode.strength=0.5"])
    assert cfg.decode.strength == 0.5
    with pytest.raises(config_mod.ConfigError, match="decode.strenght: unknown key"):
        config_mod.load(None, STAGES, ["decode.strenght=1"])


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
    assert status(pipe) == ["missing", "missing", "missing"]
    pipe.run(["numbers"])
    assert status(pipe) == ["fresh", "missing", "missing"]
    pipe.run(["report"])
    assert status(make(tmp_path, ["square.offset=2"])) == ["fresh", "stale", "stale"]
    assert status(make(tmp_path, ["numbers.count=3"])) == ["stale", "stale", "stale"]


def test_manifest_records_counts_reasons_stats_and_versions(tmp_path):
    pipe = make(tmp_path)
    pipe.run(["square"])
    manifest = json.loads((pipe.store.stage_dir("square") / "_manifest.json").read_text())
    assert manifest["rows_in"] == {"numbers.values": 20}
    assert manifest["rows_out"] == {"squares": 17}
    assert manifest["rejected_by_reason"] == {"multiple_of_seven": 3}
    assert manifest["stats"] == {"kept": 17}  # summed over the five chunks
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


# --- code and model identity --------------------------------------------------------------------

# Which stages import each shared module, directly or through another: editing it must make
# exactly these stale (sample/inject/rewrite generate; filter/inject/rewrite score; format renders).
DEPENDENTS = {
    "pipeline/backends.py": {"sample", "inject", "rewrite", "eval"},
    "pipeline/scorers.py": {"filter", "inject", "natural", "rewrite", "eval"},
    # publish's -tok twins and the trainer re-count rlbf's n by the renderer's take-back rule.
    "pipeline/render.py": {"format", "publish", "train", "eval"},
    # publish builds the tokenized twins with the trainer's encoder, which renders prompts and
    # redraws k (prompting, seeds).
    "pipeline/prompting.py": {"sample", "inject", "rewrite", "publish", "train", "eval"},
    "pipeline/seeds.py": {
        "sample",
        "inject",
        "natural",
        "rewrite",
        "format",
        "blend",
        "publish",
        "train",
        "eval",
    },
}


def _code_hashes(root: Path) -> dict[str, str]:
    from pipeline.digest import hash_files

    stages = load_stages()
    found = {}
    for name in stages:
        files = import_closure([root / "stages" / f"{name}.py"], (root,))
        found[name] = hash_files(files)
    return found


@pytest.mark.parametrize("module", sorted(DEPENDENTS))
def test_editing_a_shared_module_makes_exactly_its_dependents_stale(tmp_path, module):
    copy = tmp_path / "tree"
    for package in ("pipeline", "stages", "trainer"):
        shutil.copytree(PROJECT_ROOT / package, copy / package)
    before = _code_hashes(copy)
    with open(copy / module, "a") as f:
        f.write("\n# an edit\n")
    after = _code_hashes(copy)
    assert {s for s in before if before[s] != after[s]} == DEPENDENTS[module]


def test_the_stage_interface_imports_no_project_module():
    stage_py = PROJECT_ROOT / "pipeline/stage.py"
    closure = import_closure([stage_py], (PROJECT_ROOT,))
    assert closure == sorted([stage_py, PROJECT_ROOT / "pipeline/__init__.py"])


_STATUS_CHILD = """
import sys
from fakestages import STAGES
from pipeline import config
from pipeline.dag import Pipeline
pipe = Pipeline(config.load(sys.argv[1], STAGES), STAGES)
if sys.argv[2] == "run":
    pipe.run(["report"])
print(",".join(pipe.statuses(list(STAGES)).values()))
"""


def test_an_edited_helper_module_makes_its_stage_and_dependents_stale(tmp_path):
    shutil.copytree(ROOT / "tests/fakestages", tmp_path / "fs/fakestages")
    env = {**CHILD_ENV, "PYTHONPATH": f"{tmp_path / 'fs'}{os.pathsep}{ROOT}"}
    make(tmp_path)  # writes cfg.yaml
    cfg = str(tmp_path / "cfg.yaml")
    assert run_child(_STATUS_CHILD, cfg, "run", env=env).stdout.split() == ["fresh,fresh,fresh"]
    with open(tmp_path / "fs/fakestages/arith.py", "a") as f:
        f.write("\n# an edit\n")
    assert run_child(_STATUS_CHILD, cfg, "status", env=env).stdout.split() == ["fresh,stale,stale"]


def test_same_size_weights_saved_over_make_the_stage_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRACE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 4096)
    overrides = [f"square.generator.model={model}"]
    make(tmp_path, overrides).run(["square"])
    assert status(make(tmp_path, overrides))[:2] == ["fresh", "fresh"]
    (model / "model.safetensors").write_bytes(b"\x01" * 4096)  # new weights, same size
    assert status(make(tmp_path, overrides))[:2] == ["fresh", "stale"]


def test_a_stage_can_add_model_fingerprints_to_its_key(tmp_path, monkeypatch):
    pipe = make(tmp_path)
    pipe.run(["square"])
    monkeypatch.setattr(square, "fingerprints", lambda cfg: [{"tokenizer": "v2"}], raising=False)
    monkeypatch.setattr(square, "SPEC", dataclasses.replace(square.SPEC, hooks=("fingerprints",)))
    assert status(make(tmp_path))[1] == "stale"
    assert make(tmp_path).key("square")[1]["models"] == [{"tokenizer": "v2"}]


# --- the stage contract -------------------------------------------------------------------------


def test_a_misspelt_or_undeclared_hook_fails_instead_of_leaving_the_key(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown hook.*external_file"):
        StageSpec(name="x", hooks=("external_file",))
    monkeypatch.setattr(square, "fingerprints", lambda cfg: [], raising=False)
    with pytest.raises(StageError, match="square defines fingerprints without naming it"):
        make(tmp_path)
    monkeypatch.delattr(square, "fingerprints")
    monkeypatch.setattr(square, "SPEC", dataclasses.replace(square.SPEC, hooks=("fingerprints",)))
    with pytest.raises(StageError, match="SPEC.hooks names fingerprints but the module has none"):
        make(tmp_path)


@pytest.mark.parametrize(
    "column,problem",
    [
        (pa.array(["1"]), "column 'square' is string, its schema says int64"),
        (pa.nulls(1), "column 'square' is null, its schema says int64"),
    ],
)
def test_a_wrong_output_column_fails_naming_stage_table_and_column(
    tmp_path, monkeypatch, column, problem
):
    def run(inputs, cfg, env):
        return {
            "squares": pa.table({"id": pa.array(["a"]), "square": column}),
            "rejected": records.table([], records.REJECTED),
        }

    monkeypatch.setattr(square, "run", run)
    with pytest.raises(StageError, match=f"stage square: output squares: {problem}"):
        make(tmp_path).run(["square"])


def test_a_failing_chunk_is_named_with_its_stage_and_index(tmp_path, monkeypatch):
    real, calls = square.run, []

    def run(inputs, cfg, env):
        calls.append(1)
        if len(calls) == 3:
            return {}["response"]  # a bug inside the stage
        return real(inputs, cfg, env)

    monkeypatch.setattr(square, "run", run)
    with pytest.raises(KeyError) as err:
        make(tmp_path).run(["square"])
    assert err.value.__notes__ == ["in stage square, chunk 2"]


# --- empty inputs -------------------------------------------------------------------------------


def test_an_all_rejected_input_stops_the_next_stage_with_one_line(tmp_path):
    pipe = make(tmp_path, ["numbers.reject_all=true", "numbers.max_rejected_share=1"])
    with pytest.raises(StageError) as err:
        pipe.run(["square"])
    line = str(err.value)
    assert "\n" not in line
    assert "stage square cannot start: its input numbers.values is empty" in line
    assert "numbers rejected 20 row(s): unwanted 20" in line
    assert str(pipe.store.table_dir("numbers", "rejected")) in line
    # The empty table is typed from its declared schema, not inferred as null.
    part = pq.read_table(pipe.store.table_dir("numbers", "values"))
    assert part.num_rows == 0 and part.schema.equals(numbers.SCHEMA)


def test_a_stage_with_an_empty_required_input_stops_naming_upstream_reasons(tmp_path):
    pipe = make(tmp_path, ["numbers.count=1", "square.max_rejected_share=1"])  # only 0: rejected
    with pytest.raises(StageError, match="report cannot start: its input square.squares is empty"):
        pipe.run(["report"])
    assert pipe.store.read("square", "squares").schema.equals(square.SCHEMA)


# --- resume -------------------------------------------------------------------------------------

_CHILD = """
import sys
from fakestages import STAGES
from pipeline import config
from pipeline.dag import Pipeline
target = sys.argv[2] if len(sys.argv) > 2 else "square"
Pipeline(config.load(sys.argv[1], STAGES), STAGES).run([target])
"""


def test_killed_stage_resumes_without_losing_or_duplicating_rows(tmp_path, monkeypatch):
    pipe = make(tmp_path)  # writes cfg.yaml; chunks of 4 values: 0-3, 4-7, 8-11, ...
    log = tmp_path / "calls.log"
    env = {**CHILD_ENV, "RETRACE_TEST_KILL_AT": "12", "RETRACE_TEST_LOG": str(log)}
    child = run_child(_CHILD, str(tmp_path / "cfg.yaml"), env=env)  # dies before the 4th chunk
    assert child.returncode == 137, child.stderr[-2000:]
    assert log.read_text().splitlines() == ["0,1,2,3", "4,5,6,7", "8,9,10,11"]
    assert status(pipe)[1] == "partial" and pipe.store.manifest("square") is None

    monkeypatch.setenv("RETRACE_TEST_LOG", str(log))
    assert pipe.run(["square"]) == {"numbers": "cached", "square": "ran"}
    # Only the unfinished chunks ran again, and every row is there exactly once.
    assert log.read_text().splitlines()[3:] == ["12,13,14,15", "16,17,18,19"]
    ids = pipe.store.read("square", "squares").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 17
    assert squares(pipe) == expected()
    manifest = pipe.store.manifest("square")
    assert manifest["rows_in"] == {"numbers.values": 20} and manifest["stats"] == {"kept": 17}


# --- streamed outputs ---------------------------------------------------------------------------


def test_a_streamed_table_is_written_batch_by_batch_with_the_same_rows(tmp_path, monkeypatch):
    whole = make(tmp_path / "whole")
    whole.run(["square"])
    monkeypatch.setenv("RETRACE_TEST_STREAM", "1")
    streamed = make(tmp_path / "streamed")
    streamed.run(["square"])
    assert squares(streamed) == squares(whole) == expected()
    part = pq.ParquetFile(streamed.store.table_dir("square", "squares") / "part-00000.parquet")
    # Squares of 1, 2 and 3: each batch went to the file as it came, never gathered first.
    assert part.metadata.num_row_groups == 3 and part.schema_arrow.equals(square.SCHEMA)


def test_a_kill_while_a_streamed_part_is_written_resumes_from_that_chunk(tmp_path, monkeypatch):
    pipe = make(tmp_path)
    log = tmp_path / "calls.log"
    env = {
        **CHILD_ENV,
        "RETRACE_TEST_STREAM": "1",
        "RETRACE_TEST_KILL_IN_STREAM": "8",  # inside chunk 2's squares, after one batch
        "RETRACE_TEST_LOG": str(log),
    }
    child = run_child(_CHILD, str(tmp_path / "cfg.yaml"), env=env)
    assert child.returncode == 137, child.stderr[-2000:]
    (work,) = pipe.store.stage_dir("square").glob(".work-*")
    assert [p.name for p in (work / "squares").glob(".*.tmp-*")][0].startswith(".part-00002")
    assert not (work / "squares" / "part-00002.parquet").exists()

    monkeypatch.setenv("RETRACE_TEST_STREAM", "1")
    monkeypatch.setenv("RETRACE_TEST_LOG", str(log))
    assert pipe.run(["square"]) == {"numbers": "cached", "square": "ran"}
    assert log.read_text().splitlines()[3:] == ["8,9,10,11", "12,13,14,15", "16,17,18,19"]
    ids = pipe.store.read("square", "squares").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 17 and squares(pipe) == expected()
    assert not list(pipe.store.root.rglob(".*tmp*"))


def test_a_streamed_batch_off_its_schema_fails_before_any_part_is_written(tmp_path, monkeypatch):
    def run(inputs, cfg, env):
        good = pa.record_batch([pa.array(["a"]), pa.array([1])], schema=square.SCHEMA)
        bad = pa.record_batch({"id": pa.array(["b"]), "square": pa.array(["1"])})
        return {
            "squares": pa.RecordBatchReader.from_batches(square.SCHEMA, iter([good, bad])),
            "rejected": records.table([], records.REJECTED),
        }

    monkeypatch.setattr(square, "run", run)
    pipe = make(tmp_path)
    problem = "column 'square' is string, its schema says int64"
    with pytest.raises(StageError, match=f"stage square: output squares: {problem}"):
        pipe.run(["square"])
    (work,) = pipe.store.stage_dir("square").glob(".work-*")
    assert not list(work.rglob("*.parquet")) and not list(work.rglob(".*tmp*"))
    assert pipe.store.manifest("square") is None


# The child kills itself with a real SIGKILL at one rename inside finalize of one stage: before
# rename k (k = 1..n), or after the last (k = n + 1); k = 0 never kills and prints n.
_FINALIZE_CHILD = """
import os, signal, sys
from fakestages import STAGES
from pipeline import config, store
from pipeline.dag import Pipeline
target, kill_at = sys.argv[2], int(sys.argv[3])
renames, inside = 0, False
real_replace = os.replace
real_finalize, real_replay = store.RunStore.finalize, store.RunStore._replay
def replace(src, dst):
    global renames
    if inside:
        renames += 1
        if renames == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
def replay(self, stage, work):
    real_replay(self, stage, work)
    if inside and kill_at == renames + 1:
        os.kill(os.getpid(), signal.SIGKILL)
def finalize(self, stage, *args):
    global inside
    inside = stage == target
    real_finalize(self, stage, *args)
    if inside:
        print("renames", renames)
    inside = False
os.replace = replace
store.RunStore.finalize, store.RunStore._replay = finalize, replay
Pipeline(config.load(sys.argv[1], STAGES), STAGES).run([target])
"""


def _snapshot(run_dir: Path) -> dict[str, object]:
    """Every file of a run by relative path: bytes, manifests without their timing."""
    found: dict[str, object] = {}
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or path.name == ".lock":
            continue
        rel = str(path.relative_to(run_dir))
        if path.name == "_manifest.json":
            manifest = json.loads(path.read_text())
            manifest.pop("seconds")
            found[rel] = manifest
        else:
            found[rel] = path.read_bytes()
    return found


def _setup(folder: Path, prior: Path | None) -> Path:
    """A config with square.offset=1 over a copy of an earlier run's outputs (offset 0)."""
    folder.mkdir(parents=True)
    if prior is not None:
        shutil.copytree(prior, folder / "runs/default")
    cfg = folder / "cfg.yaml"
    cfg.write_text(f"run:\n  runs_dir: {folder}/runs\n  chunk_size: 4\nsquare:\n  offset: 1\n")
    return cfg


@pytest.mark.parametrize("stage", ["square", "report"])
def test_a_kill_at_any_rename_in_finalize_loses_nothing(tmp_path, stage):
    """square is chunked with two tables; report, like publish, has no chunks and a files folder.
    Each run finalizes over the outputs of an earlier run with another config."""
    prior = make(tmp_path / "prior")
    prior.run(["report"])
    reference_cfg = _setup(tmp_path / "reference", prior.store.root)
    reference = Pipeline(config_mod.load(reference_cfg, STAGES), STAGES)
    reference.run([stage])
    want = _snapshot(reference.store.root)
    assert stage in {k.split("/")[0] for k in want}

    counted = run_child(
        _FINALIZE_CHILD, str(_setup(tmp_path / "count", prior.store.root)), stage, "0"
    )
    assert counted.returncode == 0, counted.stderr[-2000:]
    renames = int(counted.stdout.split()[-1])
    assert renames >= 4  # the commit record, one per table or folder, the manifest
    for kill_at in range(1, renames + 2):
        cfg = _setup(tmp_path / f"kill{kill_at}", prior.store.root)
        child = run_child(_FINALIZE_CHILD, str(cfg), stage, str(kill_at))
        assert child.returncode == -signal.SIGKILL, (kill_at, child.stderr[-2000:])
        pipe = Pipeline(config_mod.load(cfg, STAGES), STAGES)
        pipe.run([stage])
        assert _snapshot(pipe.store.root) == want, f"killed at rename {kill_at} of {renames}"
        assert pipe.statuses([stage])[stage] == "fresh"


def test_a_work_folder_left_half_done_is_repaired_not_tripped_over(tmp_path):
    """What v0's finalize left after a kill: a chunk marked done whose tables are gone."""
    pipe = make(tmp_path)
    pipe.run(["square"])
    key, _ = pipe.key("report")
    work = pipe.store.work_dir("report", key)
    (work / "_done").mkdir(parents=True)
    (work / "_done" / "00000").touch()
    (work / "rejected").mkdir()
    assert pipe.run(["report"])["report"] == "ran"
    assert (pipe.store.files_dir("report") / "README.md").is_file()
    # --force with such a folder starts it afresh.
    (work / "_done").mkdir(parents=True)
    (work / "_done" / "00000").touch()
    assert pipe.run(["report"], force={"report"})["report"] == "ran"
    assert not list(pipe.store.stage_dir("report").glob(".work-*"))


def test_no_half_written_files_under_final_names(tmp_path):
    pipe = make(tmp_path)
    pipe.run(["report"])
    folder = pipe.store.stage_dir("square")
    assert not list(pipe.store.root.rglob(".*tmp*")) and not list(folder.glob(".work-*"))
    for part in (folder / "squares").glob("*.parquet"):
        pq.read_metadata(part)  # every part is a complete Parquet file


def test_same_config_same_bytes(tmp_path):
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    a.run(["report"]), b.run(["report"])
    assert _snapshot(a.store.root) == _snapshot(b.store.root)


# --- one writer ---------------------------------------------------------------------------------


def test_a_second_run_on_the_same_run_name_is_refused(tmp_path):
    """Two runs with different configs on one run name: the second is refused, naming the first;
    the first finishes with its own config throughout."""
    make(tmp_path)  # cfg.yaml
    hold = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "cfg.yaml"), "report"],
        env={**CHILD_ENV, "RETRACE_TEST_HOLD": str(hold)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not hold.with_suffix(".waiting").exists():  # the first run is inside square
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    other = tmp_path / "other"
    make(other, text=f"run:\n  runs_dir: {tmp_path}/runs\nnumbers:\n  count: 5\n")
    second = run_child(_CHILD, str(other / "cfg.yaml"), "numbers")
    hold.touch()
    assert first.wait(60) == 0, first.communicate()
    assert second.returncode == 1 and "RunLocked" in second.stderr
    assert f"run {tmp_path}/runs/default is in use by pid {first.pid}" in second.stderr
    assert "another run.name" in second.stderr
    pipe = make(tmp_path)
    assert status(pipe) == ["fresh", "fresh", "fresh"]
    assert (pipe.store.files_dir("report") / "README.md").read_text() == "# squares\n\n17 values\n"
    assert pipe.store.manifest("numbers")["config"]["count"] == 20


# --- executors ----------------------------------------------------------------------------------


class _Reversed:
    """An executor that computes every pending chunk first and hands them back last to first, as
    a pool of workers may: the engine must write the same run whatever the order."""

    def map(self, stage, module, section, env, chunks):
        results = [(i, run_chunk(stage, i, module, inputs, section, env)) for i, inputs in chunks]
        yield from reversed(results)


def test_another_executor_writes_the_same_run(tmp_path, monkeypatch):
    local = make(tmp_path / "local")
    local.run(["report"])
    monkeypatch.setitem(EXECUTORS, "local", lambda run: _Reversed())
    other = make(tmp_path / "other")
    other.run(["report"])
    assert _snapshot(other.store.root) == _snapshot(local.store.root)


def test_a_failure_outside_a_chunk_still_names_the_stage(tmp_path, monkeypatch):
    from pipeline import store

    def full(*args):
        raise OSError(28, "No space left on device", str(tmp_path / "runs"))

    monkeypatch.setattr(store.RunStore, "finalize", full)
    with pytest.raises(OSError) as err:
        make(tmp_path).run(["numbers"])
    assert err.value.__notes__ == ["in stage numbers"]


# --- torn manifests, read-only media, a run in progress ------------------------------------------


@pytest.mark.parametrize("torn", [b"", b'{"stage": "square", "key": "ab', b"\x00\xff\xfe", b"[]"])
def test_a_torn_or_corrupt_manifest_means_not_finished(tmp_path, torn):
    """A 0-byte or unparseable _manifest.json (a kill, a full disk) is a stage to run again,
    not a traceback on every rerun."""
    pipe = make(tmp_path)
    pipe.run(["report"])
    (pipe.store.stage_dir("square") / "_manifest.json").write_bytes(torn)
    assert pipe.store.manifest("square") is None
    assert status(pipe) == ["fresh", "missing", "stale"]
    # square's rows come out the same, so report (keyed by their content) stays cached.
    outcome = make(tmp_path).run(["report"])
    assert outcome == {"numbers": "cached", "square": "ran", "report": "cached"}
    assert squares(pipe) == expected() and status(make(tmp_path)) == ["fresh"] * 3


@pytest.fixture
def read_only():
    """Bind-mount a folder read-only onto itself (root ignores permission bits, not a read-only
    mount); skipped where this process may not mount."""
    mounted: list[Path] = []

    def mount(path: Path) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root and mount(8) for a read-only bind mount")
        for args in (["--bind", path, path], ["-o", "remount,bind,ro", path]):
            done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
            if done.returncode:
                for p in [*mounted, path]:
                    subprocess.run(["umount", str(p)], capture_output=True)
                pytest.skip(f"cannot bind-mount read-only here: {done.stderr.strip()}")
            mounted.append(path) if args[0] == "--bind" else None

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


def test_a_finished_run_on_read_only_media_is_a_no_op(tmp_path, read_only):
    make(tmp_path).run(["report"])
    before = _snapshot(tmp_path / "runs")
    read_only(tmp_path / "runs")
    with pytest.raises(OSError) as err:  # the media really is read-only
        (tmp_path / "runs" / "probe").write_text("x")
    assert err.value.errno == errno.EROFS
    text = f"run:\n  runs_dir: {tmp_path}/runs\n  chunk_size: 4\n"  # its cfg.yaml is elsewhere
    pipe = make(tmp_path / "cfg", text=text)
    assert pipe.run(["report"]) == {"numbers": "cached", "square": "cached", "report": "cached"}
    assert status(pipe) == ["fresh"] * 3 and _snapshot(tmp_path / "runs") == before
    # Something to write is still the one-line read-only error, naming the lock it could not open.
    with pytest.raises(OSError) as err:
        make(tmp_path / "other", ["square.offset=3"], text=text).run(["report"])
    assert err.value.errno == errno.EROFS and err.value.filename == str(pipe.store.root / ".lock")


def test_status_says_running_with_the_last_line_a_running_stage_logged(tmp_path, capsys):
    from pipeline.cli import _print_status

    make(tmp_path)
    hold = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "cfg.yaml"), "report"],
        env={**CHILD_ENV, "RETRACE_TEST_HOLD": str(hold)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not hold.with_suffix(".waiting").exists():  # the first run is inside square
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        pipe = make(tmp_path)
        assert status(pipe) == ["fresh", "running", "missing"]
        progress = pipe.progress("square", "running")
        assert f"by pid {first.pid} (`" in progress and ", running square" in progress
        assert progress.endswith("last: square: holding in chunk 0")
        _print_status(pipe)
        out = capsys.readouterr().out
        assert "running" in out and "square running: by pid" in out
    finally:
        hold.touch()
        assert first.wait(60) == 0, first.communicate()
    assert status(make(tmp_path)) == ["fresh", "fresh", "fresh"]  # released: no longer running


def test_a_killed_stage_with_files_in_its_attempt_is_partial_not_missing(tmp_path):
    """A training killed after a checkpoint keeps files in its attempt and resumes from them."""
    pipe = make(tmp_path)
    pipe.run(["square"])
    work = pipe.store.work_dir("report", pipe.key("report")[0])
    (work / "files" / "checkpoints" / "step-0000002").mkdir(parents=True)
    (work / "_note").write_text("step 2/10 | loss 1.5")
    assert status(pipe) == ["fresh", "fresh", "partial"]
    assert pipe.progress("report", "partial") == "resumable; last: step 2/10 | loss 1.5"

"""`run.executor: ray` on a local Ray (2 CPUs): the tiny-model pipeline of test_pipeline.py gives
the same bytes as the local executor, stage by stage; a run killed mid-stage resumes on Ray from
its finished chunks without loss or duplicates. One Ray session serves the whole module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline import small_config
from typer.testing import CliRunner

from pipeline import config as config_mod
from pipeline import store
from pipeline.cli import app, load_stages
from stages import DATASET_STAGES

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
ray = pytest.importorskip("ray", reason="the Ray tests need `pip install 'retrace[ray]'`")


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _run(config: Path, *args: str, command: str = "run") -> str:
    result = runner.invoke(app, [command, *args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, fluent_model_dir, ray_address):
    """The same config run by the local executor and by Ray (two sample actors)."""
    local = tmp_path_factory.mktemp("local")
    _run(small_config(local, fluent_model_dir))
    on_ray = tmp_path_factory.mktemp("on-ray")
    ray_args = ["--set", "run.executor=ray", "--set", "run.ray.stages.sample.actors=2"]
    _run(small_config(on_ray, fluent_model_dir), *ray_args)
    return local / "runs/small", on_ray / "runs/small"


def test_every_stage_writes_the_same_bytes_on_ray(two_runs):
    local, on_ray = two_runs
    parts = sorted(p.relative_to(local) for p in local.rglob("*.parquet"))
    assert any(p.parts[0] == "sample" for p in parts) and any(p.parts[0] == "inject" for p in parts)
    assert parts == sorted(p.relative_to(on_ray) for p in on_ray.rglob("*.parquet"))
    for part in parts:
        assert (local / part).read_bytes() == (on_ray / part).read_bytes(), part


def test_manifests_and_the_card_are_the_executors_too(two_runs):
    local, on_ray = two_runs
    for stage in DATASET_STAGES:
        a, b = (json.loads((run / stage / store.MANIFEST).read_text()) for run in two_runs)
        for field in ("key", "key_parts", "config", "rows_in", "rows_out", "rejected_by_reason"):
            assert a[field] == b[field], (stage, field)
        tables = {t: o for t, o in a["outputs"].items() if t != store.FILES}
        assert tables == {t: o for t, o in b["outputs"].items() if t != store.FILES}, stage
    # The card embeds the config without the executor: only the run folder's path differs.
    card = (local / "publish/files/README.md").read_text()
    ray_card = (on_ray / "publish/files/README.md").read_text()
    assert "executor" not in card
    assert card.replace(str(local.parent), str(on_ray.parent)) == ray_card


def test_a_ray_run_killed_mid_stage_resumes_from_its_finished_chunks(
    tmp_path, fluent_model_dir, ray_address, two_runs
):
    local, _ = two_runs
    config = small_config(tmp_path, fluent_model_dir)  # ten prompts, three chunks
    run = tmp_path / "runs/small"
    shutil.copytree(local / "sources", run / "sources")  # a cache hit: only sample runs
    # One actor: chunks finish one after another, so the kill lands between two of them.
    on_ray = ["--set", "run.executor=ray", "--set", f"run.ray.address={ray_address}"]
    on_ray += ["--set", "run.ray.stages.sample.actors=1"]
    command = [sys.executable, "-c", "from pipeline.cli import app; app()", "stage", "sample"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = run / "sample"
    # Now and then every chunk is done (or the whole stage has finished) before the kill lands
    # and nothing is left to resume: then the kill is tried again on a fresh folder.
    for _attempt in range(5):
        shutil.rmtree(done, ignore_errors=True)
        child = subprocess.Popen(
            [*command, "--config", str(config), *on_ray],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while not list(done.glob(".work-*/_done/*")) and time.monotonic() < deadline:
            if child.poll() is not None:  # finished between two looks, or failed
                assert child.returncode == 0, child.stderr.read().decode()[-2000:]
                break
            time.sleep(0.05)
        child.kill()
        child.wait()
        finished = 3 if child.returncode == 0 else len(list(done.glob(".work-*/_done/*")))
        if finished < 3:
            break
    assert 1 <= finished < 3 and not (done / store.MANIFEST).exists()

    output = _run(config, "sample", *on_ray, command="stage")
    assert "sources: cached" in output
    assert f"sample: resuming after {finished} finished chunk(s)" in output
    resumed = store.parts(done / "samples")
    ids = store.read_parts(done / "samples").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20  # ten prompts, two samples each
    # What the uninterrupted local run wrote, part by part.
    expected = store.parts(local / "sample/samples")
    assert [p.read_bytes() for p in resumed] == [p.read_bytes() for p in expected]


def test_ray_settings_are_checked_before_any_work():
    stages = load_stages()
    with pytest.raises(config_mod.ConfigError, match=r"run\.ray\.stages.*unknown stage.*smaple"):
        config_mod.validate({"run": {"ray": {"stages": {"smaple": {"actors": 2}}}}}, stages)
    with pytest.raises(config_mod.ConfigError, match=r"run\.ray\.stages\.sample\.actors"):
        config_mod.validate({"run": {"ray": {"stages": {"sample": {"actors": 0}}}}}, stages)
    with pytest.raises(config_mod.ConfigError, match=r"run\.executor"):
        config_mod.validate({"run": {"executor": "dask"}}, stages)

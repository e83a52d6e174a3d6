"""The `openai` backend against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1,
serving the fluent tiny Gemma (tests/tiny_gemma.py) from a subprocess.

What a user relies on: the same prompt (and so, greedy, the same text) as the in-process backend;
the chat endpoint formatting what the completions endpoint sends; rows whose requests die with the
server rejected with its reason after the retries (as `server_unavailable`, which the next run
retries); the API key sent and never written. tests/test_openai_faults.py has the misbehaving
servers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
import yaml
from test_sample import TOPICS, prompt_rows, run_sample
from typer.testing import CliRunner

import stages.sample as sample
from pipeline import config as config_mod
from pipeline import records, store
from pipeline.backend_openai import ServerError
from pipeline.backends import GeneratorSpec, SamplingParams, TransformersGenerator, load_generator
from pipeline.cli import app, load_stages
from pipeline.env import LocalEnv
from pipeline.taxonomy import PROMPTS_DIR

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve <model>` in a subprocess, pinned to one model."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.port = str(model), _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx2.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return
            except httpx2.TransportError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"transformers serve did not come up in 120 s: {log.read_text()[-2000:]}"
        )

    def spec(self, **kw) -> GeneratorSpec:
        fields = {"backend": "openai", "model": self.model, "base_url": self.base_url}
        return GeneratorSpec(**{**fields, "max_retries": 2, "batch_size": 2, **kw})

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@contextmanager
def serving(model: Path, log: Path) -> Iterator[Server]:
    server = Server(model, log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def chat_model_dir(fluent_model_dir, tmp_path_factory) -> Path:
    """The fluent model with Gemma's turn format as its chat template, for the chat endpoint."""
    folder = tmp_path_factory.mktemp("chat-gemma") / "model"
    shutil.copytree(fluent_model_dir, folder)
    (folder / "chat_template.jinja").write_text((PROMPTS_DIR / "chat/gemma.jinja").read_text())
    return folder


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory) -> Iterator[Server]:
    with serving(chat_model_dir, tmp_path_factory.mktemp("serve") / "serve.log") as running:
        yield running


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def _conversations(generator, topics=TOPICS[:4]):
    return [generator.format_chat([records.message("user", f"Tell me about {t}.")]) for t in topics]


def test_greedy_completions_through_the_server_match_the_in_process_backend(server):
    local = TransformersGenerator(GeneratorSpec(model=server.model, batch_size=1))
    remote = load_generator(server.spec())
    prompts = _conversations(local)
    assert _conversations(remote) == prompts  # the same text is formatted for the server
    want = local.generate(prompts, GREEDY, [0] * len(prompts))
    got = remote.generate(prompts, GREEDY, [0] * len(prompts))
    assert all(w[0].text.strip() for w in want)
    assert [g[0].text for g in got] == [w[0].text for w in want]
    assert [g[0].finish_reason for g in got] == [w[0].finish_reason for w in want]
    assert [g[0].completion_tokens for g in got] == [w[0].completion_tokens for w in want]
    assert [g[0].prompt_tokens for g in got] == [w[0].prompt_tokens for w in want]


def test_the_chat_endpoint_lets_the_server_format_the_same_turns(server):
    completions = load_generator(server.spec())
    chat = load_generator(server.spec(endpoint="chat"))
    turns = [[records.message("user", f"Tell me about {t}.")] for t in TOPICS[:3]]
    plain = completions.generate([completions.format_chat(m) for m in turns], GREEDY, [1, 2, 3])
    served = chat.generate([chat.format_chat(m) for m in turns], GREEDY, [1, 2, 3])
    assert [g[0].text for g in served] == [g[0].text for g in plain]
    # Prompt tokens are counted on the local template, as for completions.
    assert chat.count_tokens([chat.format_chat(turns[0])]) == completions.count_tokens(
        [completions.format_chat(turns[0])]
    )


def test_n_samples_from_a_server_that_ignores_n_are_requested_one_by_one(server):
    generator = load_generator(server.spec())
    prompt = _conversations(generator)[:1]
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3)
    gens = generator.generate(prompt, params, [7])[0]
    assert len(gens) == 3 and all(g.finish_reason != "error" for g in gens)
    # The first sample carries the request's seed, the others seeds derived from it.
    assert gens[0].seed == 7 and len({g.seed for g in gens}) == 3


class _KillAfterFirstBatch(LocalEnv):
    """Stops the server as soon as the stage reports its first finished batch."""

    def __init__(self, server: Server) -> None:
        super().__init__(seed=0)
        self.server = server

    @contextmanager
    def progress(self, desc, total, unit="rows"):
        server = self.server

        class _Progress:
            def advance(self, rows=1, tokens=0):
                if server.proc.poll() is None:
                    server.stop()

        yield _Progress()


def test_a_server_stopped_mid_run_gets_retries_then_each_row_is_rejected_with_its_reason(
    chat_model_dir, tmp_path
):
    # The stage hands the generator sample.CALL_BATCHES batches per call: one call's worth of
    # prompts (batch size 1) plus a few more, so the server dies with requests still to come.
    rows = prompt_rows([f"{t} {i}" for i in range(2) for t in TOPICS])[: sample.CALL_BATCHES + 4]
    with serving(chat_model_dir, tmp_path / "serve.log") as server:
        spec = server.spec(max_retries=2, batch_size=1)
        cfg = sample.Config(generator=spec, n=1, max_new_tokens=6, fewshot=None)
        env = _KillAfterFirstBatch(server)
        started = time.monotonic()
        out = run_sample(cfg, rows, env=env)
        elapsed = time.monotonic() - started
    samples, rejected = out["samples"].to_pylist(), out["rejected"].to_pylist()
    # The first call made it; every later row is rejected, none dropped, as a server failure the
    # next run retries.
    assert len(samples) == sample.CALL_BATCHES * spec.batch_size
    assert len(samples) + len(rejected) == len(rows)
    assert {r["reason"] for r in rejected} == {"server_unavailable"}
    for r in rejected:
        assert r["detail"].startswith(f"{server.base_url}/completions: ConnectError")
        assert r["detail"].endswith("(after 3 attempts)")
    # Two backoffs per request (0.25-0.5 s, then 0.5-1 s), one request in flight at a time.
    batches = (len(rows) - len(samples)) // spec.batch_size
    assert elapsed > batches * 0.75


def test_an_unreachable_server_or_a_model_it_lacks_fails_before_any_work(server):
    dead = GeneratorSpec(backend="openai", base_url=f"http://127.0.0.1:{_free_port()}/v1")
    with pytest.raises(ServerError, match=r"openai backend: .*/v1/models: ConnectError.*start"):
        load_generator(dead.model_copy(update={"max_retries": 0, "tokenizer": server.model}))
    with pytest.raises(ServerError, match=r"does not serve model 'someone/else'.*serves "):
        load_generator(server.spec(model="someone/else", tokenizer=server.model))


def test_backend_openai_without_base_url_fails_at_config_time():
    with pytest.raises(config_mod.ConfigError, match=r"sample\.generator.*needs base_url"):
        config_mod.validate({"sample": {"generator": {"backend": "openai"}}}, load_stages())


def test_a_pipeline_through_the_server_never_writes_the_api_key(server, tmp_path, monkeypatch):
    secret = "sk-retrace-test-5f2c9d7e1a"
    monkeypatch.setenv("RETRACE_TEST_KEY", secret)
    cfg = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    cfg["run"].update(runs_dir=str(tmp_path / "runs"), chunk_size=4)
    cfg["sources"]["benign"][0]["limit"] = 6
    generator = {**server.spec().model_dump(mode="json"), "api_key_env": "RETRACE_TEST_KEY"}
    cfg["sample"].update(generator=generator, n=1, max_new_tokens=8)
    path = tmp_path / "openai.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["stage", "sample", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default"
    samples = store.read_parts(run / "sample/samples").to_pylist()
    assert len(samples) == 6 and {s["meta"]["backend"] for s in samples} == {"openai"}
    assert secret not in result.output
    for file in run.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file
    manifest = store.RunStore(run).manifest("sample")
    assert manifest["config"]["generator"]["api_key_env"] == "RETRACE_TEST_KEY"

"""The `openai` backend against servers that misbehave: a stub OpenAI-compatible server on
127.0.0.1 (stdlib http.server in a thread) whose every reply the test writes.

What a user relies on: a server that echoes the API key back never gets it into a file or onto
the screen; a reply of the wrong shape is one `generation_failed` row, not a dead stage; a server
that is down or lacks the model is one line; rows rejected because the server was down are run
again by the next run, and only those.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from recipe_data import WordScorer, harmful
from test_openai_backend import _free_port
from test_sample import prompt_rows, run_sample
from typer.testing import CliRunner

import stages.sample as sample
from pipeline import records, store
from pipeline.backend_openai import REDACTED, ServerError, scrub
from pipeline.backends import GeneratorSpec, SamplingParams, load_generator
from pipeline.cli import app
from pipeline.env import LocalEnv
from pipeline.errors import RetraceError
from pipeline.stage import StageSpec
from stages import rewrite

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-retrace-echo-7f3a91c2d4e5b6a8"
Answer = Callable[[str, dict, dict], tuple[int, object]]


def answer_text(prompt: str) -> str:
    """What the healthy stub answers: fixed by the prompt, so reruns can be compared."""
    return f"An answer, number {hashlib.sha256(prompt.encode()).hexdigest()[:6]}."


class Stub:
    """An OpenAI-compatible server: `answer(path, body, headers) -> (status, reply)` (a dict or
    list is sent as JSON, a str as text, bytes as a gzip body). Serves /v1/models and
    /v1/completions healthily until a test replaces `answer`; counts the completion requests."""

    def __init__(self, model: str) -> None:
        self.model, self.completions = model, 0
        self.listed = [model]  # what /v1/models lists
        self.answer: Answer = self.healthy
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._reply({})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                self._reply(json.loads(self.rfile.read(length) or b"{}"))

            def _reply(self, body: dict) -> None:
                if self.path.endswith("/completions"):
                    stub.completions += 1
                status, reply = stub.answer(self.path, body, dict(self.headers))
                text = reply if isinstance(reply, str | bytes) else json.dumps(reply)
                kind = "application/json" if isinstance(reply, dict | list) else "text/plain"
                data = text if isinstance(text, bytes) else text.encode()
                self.send_response(status)
                self.send_header("content-type", kind)
                if isinstance(reply, bytes):  # bytes: a body that claims to be gzip
                    self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet: the test's output is what it checks
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def healthy(self, path: str, body: dict, headers: dict) -> tuple[int, object]:
        if path.endswith("/models"):
            return 200, {
                "object": "list",
                "data": [{"id": m, "object": "model"} for m in self.listed],
            }
        return 200, {
            "choices": [{"index": 0, "text": answer_text(body["prompt"]), "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5},
        }

    def spec(self, **kw) -> GeneratorSpec:
        fields = {"backend": "openai", "model": self.model, "base_url": self.base_url}
        return GeneratorSpec(**{**fields, "max_retries": 0, "batch_size": 1, **kw})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub(tiny_model_dir) -> Iterator[Stub]:
    server = Stub(str(tiny_model_dir))
    try:
        yield server
    finally:
        server.close()


def write_config(tmp_path: Path, stub: Stub, runs: str = "runs", **sample_cfg) -> Path:
    """The default recipe up to sample, on 6 prompts in chunks of 4, generated through `stub`."""
    cfg = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    cfg["run"].update(runs_dir=str(tmp_path / runs), chunk_size=4)
    cfg["sources"]["benign"][0]["limit"] = 6
    generator = {**stub.spec().model_dump(mode="json"), "api_key_env": "RETRACE_TEST_KEY"}
    cfg["sample"].update(generator=generator, n=1, max_new_tokens=8, **sample_cfg)
    path = tmp_path / f"{runs}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_sample(path: Path):
    return CliRunner().invoke(app, ["stage", "sample", "--config", str(path)])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# --- item 8: the key never leaves -------------------------------------------------------------


def echo(stub: Stub, key_in_models: bool) -> Answer:
    """A server that quotes the request's headers back in its 400s (or 401s on /models), the
    way some proxies do, in every form a key could take."""

    def answer(path: str, body: dict, headers: dict) -> tuple[int, object]:
        auth = headers.get("Authorization", "")
        said = (
            f"you sent {auth}; headers {json.dumps(headers)}; query ?api_key={SECRET}&x=1; "
            f"body {json.dumps({'api_key': SECRET})}; the key itself: {SECRET}"
        )
        if path.endswith("/models") and not key_in_models:
            return stub.healthy(path, body, headers)
        return (401 if key_in_models else 400), {"error": {"message": said}}

    return answer


def assert_no_key_anywhere(run: Path, *outputs: str) -> None:
    files = [f for f in run.rglob("*") if f.is_file()]
    assert files
    for file in files:
        assert SECRET.encode() not in file.read_bytes(), file
    for output in outputs:
        assert SECRET not in output


def test_a_server_echoing_the_key_leaves_it_in_no_file_of_the_run_and_no_output(
    stub, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("RETRACE_TEST_KEY", SECRET)
    stub.answer = echo(stub, key_in_models=False)
    # Every row is rejected: the bound is lifted so the stage finishes and writes its tables.
    result = stage_sample(write_config(tmp_path, stub, max_rejected_share=1.0))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/default"
    rejected = store.read_parts(run / "sample/rejected").to_pylist()
    assert len(rejected) == 6 and {r["reason"] for r in rejected} == {"generation_failed"}
    # The detail still says what the server said, with the key taken out.
    assert f"you sent Bearer {REDACTED}" in rejected[0]["detail"]
    assert rejected[0]["detail"].startswith(f"{stub.base_url}/completions: HTTP 400: ")
    captured = capfd.readouterr()
    assert_no_key_anywhere(run, result.output, captured.out, captured.err)


def test_a_server_echoing_the_key_in_its_refusal_fails_in_one_line_without_it(
    stub, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("RETRACE_TEST_KEY", SECRET)
    stub.answer = echo(stub, key_in_models=True)
    result = stage_sample(write_config(tmp_path, stub))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    [line] = error_lines(result.output)
    assert "/v1/models: HTTP 401: you sent Bearer ***" in line
    captured = capfd.readouterr()
    assert_no_key_anywhere(tmp_path / "runs/default", result.output, captured.out, captured.err)


@pytest.mark.parametrize(
    "text",
    [
        f"you sent Bearer {SECRET}",
        f"authorization: bearer {SECRET}",
        f'{{"Authorization": "Bearer {SECRET}"}}',
        f"api_key={SECRET}&model=x",
        f'{{"api_key": "{SECRET}"}}',
        f"x-api-key: {SECRET}",
        f"the key {SECRET} is not valid",
        json.dumps(json.dumps({"api_key": SECRET})),  # escaped twice over
    ],
)
def test_scrub_takes_out_the_key_in_each_form_a_server_may_echo(text):
    assert SECRET not in scrub(text, SECRET)
    if "the key" not in text:  # a bare key is known only as the configured one
        assert SECRET not in scrub(text, None)
    assert scrub(scrub(text, SECRET), SECRET) == scrub(text, SECRET)


def test_tokens_of_other_keys_are_scrubbed_and_plain_text_is_kept():
    assert scrub("Bearer abc.def-ghi and api_key=zzz", "sk-mine") == "Bearer *** and api_key=***"
    assert scrub("model 'x' not found", "sk-mine") == "model 'x' not found"


def test_a_key_at_the_300_character_cut_leaves_no_part_of_itself(stub, monkeypatch):
    # Cut first, scrub after would keep the key's first characters.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    reply = "x" * 290 + SECRET

    def answer(path, body, headers):
        return (400, reply) if path.endswith("/completions") else stub.healthy(path, body, headers)

    stub.answer = answer
    generator = load_generator(stub.spec())
    [[gen]] = generator.generate(["Hi"], SamplingParams(max_new_tokens=4), [0])
    assert gen.finish_reason == "error" and SECRET[:6] not in gen.error


# --- item 11: replies of the wrong shape, a server down or without the model ------------------


SHAPE = "a reply of the wrong shape"
MALFORMED = {  # reply -> the row's detail, after the url
    "choices of strings": ({"choices": ["x"]}, f"{SHAPE} (choices.0: should be an object)"),
    "a token count that is a word": (
        {
            "choices": [{"text": "Fine.", "finish_reason": "stop"}],
            "usage": {"completion_tokens": "many"},
        },
        f"{SHAPE} (usage.completion_tokens: Input should be a valid integer)",
    ),
    "a negative token count": (
        {"choices": [{"text": "Fine."}], "usage": {"prompt_tokens": -3, "completion_tokens": 2}},
        f"{SHAPE} (usage.prompt_tokens: Input should be greater than or equal to 0)",
    ),
    "choices a string": ({"choices": "x"}, f"{SHAPE} (choices: Input should be a valid list)"),
    "no choices": ({"choices": []}, f"{SHAPE} (choices: List should have at least 1 item"),
    "text a number": (
        {"choices": [{"text": 5}]},
        f"{SHAPE} (choices.0.text: Input should be a valid string)",
    ),
    "usage a list": (
        {"choices": [{"text": "Fine."}], "usage": [1]},
        f"{SHAPE} (usage: should be an object)",
    ),
    "a list": ([1, 2], f"{SHAPE} (the reply: should be an object)"),
    "a choice without text": (
        {"choices": [{"message": {"content": "hi"}}]},
        "a reply with a choice that has no text",
    ),
    "not JSON": ("<html>busy</html>", "a response that is not JSON"),
    "not gzip": (b"not gzip at all", "DecodingError: "),
}


@pytest.mark.parametrize(("reply", "detail"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_reply_of_the_wrong_shape_is_one_generation_failed_row(stub, reply, detail):
    def answer(path, body, headers):
        return (200, reply) if path.endswith("/completions") else stub.healthy(path, body, headers)

    stub.answer = answer
    cfg = sample.Config(generator=stub.spec(), n=1, max_new_tokens=6, fewshot=None)
    out = run_sample(cfg, prompt_rows(["tea", "owls"]))
    rejected = out["rejected"].to_pylist()
    assert out["samples"].num_rows == 0
    assert [r["reason"] for r in rejected] == ["generation_failed"] * 2
    for row in rejected:
        assert row["detail"].startswith(f"{stub.base_url}/completions: {detail}"), row["detail"]


def test_a_chat_reply_of_the_wrong_shape_is_one_generation_failed_row(stub):
    def answer(path, body, headers):
        if path.endswith("/completions"):
            return 200, {"choices": [{"message": "hi", "finish_reason": "stop"}]}
        return stub.healthy(path, body, headers)

    stub.answer = answer
    cfg = sample.Config(generator=stub.spec(endpoint="chat"), n=1, max_new_tokens=6, fewshot=None)
    [row] = run_sample(cfg, prompt_rows(["tea"]))["rejected"].to_pylist()
    assert row["reason"] == "generation_failed"
    assert "choices.0.message" in row["detail"]


def test_a_model_list_of_another_shape_does_not_stop_the_run(stub):
    def answer(path, body, headers):
        return (
            (200, [stub.model]) if path.endswith("/models") else stub.healthy(path, body, headers)
        )

    stub.answer = answer
    cfg = sample.Config(generator=stub.spec(), n=1, max_new_tokens=6, fewshot=None)
    out = run_sample(cfg, prompt_rows(["tea"]))
    assert out["samples"].column("completion_tokens").to_pylist() == [5]


def _cli(config: Path) -> subprocess.CompletedProcess:
    """`retrace stage sample` in a child process, as a user runs it."""
    code = "import sys; from pipeline.cli import app; sys.argv[0] = 'retrace'; app()"
    return subprocess.run(
        [sys.executable, "-c", code, "stage", "sample", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_server_that_is_down_or_lacks_the_model_is_one_line_without_a_traceback(stub, tmp_path):
    down = write_config(tmp_path, stub, runs="down")
    cfg = yaml.safe_load(down.read_text())
    cfg["sample"]["generator"]["base_url"] = f"http://127.0.0.1:{_free_port()}/v1"
    down.write_text(yaml.safe_dump(cfg))
    stub.listed = ["someone/else"]
    for config, says in [
        (
            down,
            r"openai backend: http://127\.0\.0\.1:\d+/v1/models: ConnectError.*start the server",
        ),
        (write_config(tmp_path, stub, runs="other"), r"does not serve model '.*'; it serves "),
    ]:
        result = _cli(config)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        [line] = error_lines(result.stderr)
        assert re.search(says, line), line


def test_the_preflight_failure_is_a_retrace_error(stub):
    with pytest.raises(ServerError, match="does not serve model 'someone/else'"):
        load_generator(stub.spec(model="someone/else", tokenizer=stub.model))
    assert issubclass(ServerError, RetraceError)


# --- item 11: rows rejected while the server was down are retried by the next run -------------


def fail_first(stub: Stub, count: int) -> None:
    """The next `count` completion requests get 503; the rest are answered."""
    start = stub.completions

    def answer(path, body, headers):
        if path.endswith("/completions") and stub.completions - start <= count:
            return 503, {"error": {"message": "overloaded"}}
        return stub.healthy(path, body, headers)

    stub.answer = answer


def rows(run: Path, table: str) -> list[dict]:
    return sorted(store.read_parts(run / "sample" / table).to_pylist(), key=lambda r: r["id"])


def test_rows_rejected_while_the_server_was_down_are_retried_by_the_next_run_and_only_they(
    stub, tmp_path
):
    config, run = write_config(tmp_path, stub), tmp_path / "runs/default"
    # 1. Down for every request: all 6 rows rejected, past the bound; the line says a rerun helps.
    fail_first(stub, 10**6)
    result = stage_sample(config)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    [line] = error_lines(result.output)
    assert (
        "server_unavailable 6" in line and "rows rejected as server_unavailable are retried" in line
    )
    # 2. Back, but the first request fails: the failed attempt's 6 rows are retried, one fails.
    fail_first(stub, 1)
    before = stub.completions
    result = stage_sample(config)
    assert result.exit_code == 0, result.output
    assert stub.completions - before == 6
    [again] = rows(run, "rejected")
    assert again["reason"] == "server_unavailable" and "HTTP 503: overloaded" in again["detail"]
    assert "1 row(s) rejected as server_unavailable; the next run retries them" in result.output
    assert len(rows(run, "samples")) == 5
    # 2b. Down again: the row is tried once more and waits on; the samples keep their bytes, so
    # what reads them stays cached.
    outputs = store.RunStore(run).manifest("sample")["outputs"]
    fail_first(stub, 10**6)
    before = stub.completions
    assert stage_sample(config).exit_code == 0 and stub.completions - before == 1
    again = store.RunStore(run).manifest("sample")
    assert again["outputs"]["samples"] == outputs["samples"] and again["rejected"] == 1
    # 3. Healthy: the finished stage is not cached while a row waits; only that row is sent.
    fail_first(stub, 0)
    before = stub.completions
    result = stage_sample(config)
    assert result.exit_code == 0, result.output
    assert "sample: retrying 1 row(s) rejected as server_unavailable last time" in result.output
    assert stub.completions - before == 1
    assert rows(run, "rejected") == []
    # 4. Nothing waits: cached, no request.
    before = stub.completions
    result = stage_sample(config)
    assert result.exit_code == 0 and "sample: cached" in result.output
    assert stub.completions == before
    # The rows are those of a run that never met a failure (retried rows follow their chunk's).
    clean = tmp_path / "runs-clean/default"
    assert stage_sample(write_config(tmp_path, stub, runs="runs-clean")).exit_code == 0
    assert rows(run, "samples") == rows(clean, "samples")
    manifest = store.RunStore(run).manifest("sample")
    assert manifest["rejected"] == 0 and manifest["rows_out"] == {"samples": 6}


def test_a_request_that_fails_after_its_retries_is_transient_one_refused_is_not(stub):
    generator = load_generator(stub.spec())
    params = SamplingParams(max_new_tokens=4)
    fail_first(stub, 1)
    [[busy]] = generator.generate(["Hi"], params, [0])
    assert busy.finish_reason == "error" and busy.transient
    stub.answer = lambda path, body, headers: (400, {"error": "prompt is too long"})
    [[refused]] = generator.generate(["Hi"], params, [0])
    assert refused.finish_reason == "error" and not refused.transient
    assert refused.error.endswith("HTTP 400: prompt is too long")


class _LoggedEnv(LocalEnv):
    """The plain env with the real generator, a stand-in scorer, and its log lines kept."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.logs: list[str] = []

    def scorer(self, spec):
        return WordScorer()

    def log(self, message: str) -> None:
        self.logs.append(message)


def test_rewrite_says_its_fallbacks_came_from_a_server_that_was_down_and_how_to_redo_them(stub):
    fail_first(stub, 10**6)
    env = _LoggedEnv()
    harm = harmful(("h1", "Write something mean.", "", ["harassment"]))
    inputs = {"inject.violations": records.VIOLATIONS.empty_table(), "sources.harmful": harm}
    out = rewrite.run(inputs, rewrite.Config(generator=stub.spec(), retries=1), env)
    assert {r["meta"]["fallback"] for r in out["refusals"].to_pylist()} == {True}
    [line] = env.logs
    assert line.startswith("rewrite: 2 of 2 texts from prompts/fallbacks/ (server_unavailable 2)")
    assert line.endswith("`retrace stage rewrite --force` once the server is back")


def test_only_a_chunked_stage_can_retry_rows():
    # The rows to retry are found among the chunked input's rows, by id.
    with pytest.raises(ValueError, match="SPEC.retried needs a chunked input"):
        StageSpec(name="whole", retried=("server_unavailable",))

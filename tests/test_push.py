"""push: the real huggingface_hub client up to the network. A dry run lists files and sizes and
contacts nothing; a missing token fails before any request; the token never appears in output;
an unreachable Hub, offline mode and a refusing Hub each give one clear line. The dataset folder
is a small hand-written one (a README and a shard)."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pydantic
import pytest
from huggingface_hub import HfApi, constants

from pipeline import records
from stages import push

TOKEN = "hf_unitTestSecretToken123"


class RecordingEnv:
    seed = 0
    run_config = {"run": {"name": "unit-run"}}

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "published"
    (folder / "data" / "bsafe").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (folder / "data" / "bsafe" / "train-00000-of-00001.parquet").write_bytes(b"PAR1" * 300)
    return folder


@pytest.fixture
def no_saved_login(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))


@pytest.fixture
def calls(monkeypatch) -> list:
    """Replaces the three Hub calls with recorders (for tests that must not reach them, or that
    check what push asks of them)."""
    seen = []
    for name in ("create_repo", "create_branch", "upload_folder"):

        def record(self, *args, _name=name, **kwargs):
            seen.append((_name, args, kwargs))
            return "https://hub.example/commit/1" if _name == "upload_folder" else None

        monkeypatch.setattr(HfApi, name, record)
    return seen


def run_push(folder: Path, **cfg) -> RecordingEnv:
    env = RecordingEnv()
    out = push.run({"publish.files": folder}, push.Config(**cfg), env)
    assert out["rejected"].schema == records.REJECTED and out["rejected"].num_rows == 0
    return env


def test_dry_run_lists_every_file_and_size_and_contacts_nothing(dataset, no_saved_login, calls):
    env = run_push(dataset, repo_id="me/corpus", dry_run=True, endpoint="http://127.0.0.1:9")
    [listing] = env.lines
    lines = listing.splitlines()
    assert lines[0].split() == ["README.md", "28", "B"]
    assert lines[1].split() == ["data/bsafe/train-00000-of-00001.parquet", "1,200", "B"]
    assert lines[2] == "2 files, 1,228 B would be uploaded to datasets/me/corpus"
    assert calls == []


def test_a_missing_token_fails_before_any_request(dataset, no_saved_login, calls):
    with pytest.raises(push.PushError, match="no Hugging Face token; set HF_TOKEN or run"):
        run_push(dataset, repo_id="me/corpus")
    assert calls == []


def test_an_unreachable_hub_is_one_clear_line_without_the_token(
    dataset, monkeypatch, capsys, caplog
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(push.PushError) as err:
        run_push(dataset, repo_id="me/corpus", endpoint="http://127.0.0.1:9")
    message = str(err.value)
    assert message.startswith("push: cannot reach the Hub at http://127.0.0.1:9")
    assert "check the network, or use --dry-run" in message
    captured = capsys.readouterr()
    assert TOKEN not in message + captured.out + captured.err + caplog.text


def test_offline_mode_is_named(dataset, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(push.PushError, match="HF_HUB_OFFLINE is set; unset it to push"):
        run_push(dataset, repo_id="me/corpus")


class _Refuse(http.server.BaseHTTPRequestHandler):
    seen_auth: list[str] = []

    def _refuse(self) -> None:
        self.seen_auth.append(self.headers.get("authorization", ""))
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args) -> None:
        pass


def test_a_refusing_hub_says_why_and_the_token_was_sent_not_shown(dataset, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(push.PushError) as err:
            run_push(dataset, repo_id="me/corpus", endpoint=endpoint)
    finally:
        server.shutdown()
    assert str(err.value) == (
        "push: the Hub refused datasets/me/corpus (HTTP 401): the token is invalid or expired"
    )
    assert set(_Refuse.seen_auth) == {f"Bearer {TOKEN}"}  # sent to the Hub, shown nowhere


def test_push_creates_the_repo_and_branch_then_uploads_in_one_commit(dataset, monkeypatch, calls):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    env = run_push(dataset, repo_id="me/corpus", private=True, revision="v1")
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == ("me/corpus",)
    assert calls[0][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert calls[1][2] == {"branch": "v1", "repo_type": "dataset", "exist_ok": True}
    upload = calls[2][2]
    assert upload["folder_path"] == dataset and upload["repo_type"] == "dataset"
    assert upload["revision"] == "v1"
    assert upload["commit_message"] == "retrace: publish run unit-run"
    assert env.lines == [f"push: uploaded {dataset} as https://hub.example/commit/1"]


def test_push_refuses_a_folder_that_was_never_published(tmp_path, monkeypatch, calls):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(push.PushError, match="run `retrace stage publish` first"):
        run_push(tmp_path, repo_id="me/corpus")
    with pytest.raises(push.PushError, match="push.repo_id is not set"):
        run_push(tmp_path)
    assert calls == []


def test_a_malformed_repo_id_fails_in_the_config():
    with pytest.raises(pydantic.ValidationError, match="repo_id"):
        push.Config(repo_id="not a repo")

"""push: upload the published dataset folder to the Hugging Face Hub, in one commit.

Reads publish.files (the dataset folder); writes nothing and rejects nothing. Creates the dataset
repo if needed (private by choice), the branch if `revision` names one, then uploads the whole
folder with `upload_folder`, one commit whose message names the run. The token comes from
HF_TOKEN or the saved `hf auth login`; without one the stage fails before any network call. The
token is never printed: it is scrubbed from every error message. `dry_run` lists the files and
sizes that would be uploaded and contacts nothing. Never cached: it runs every time it is asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline import records
from pipeline.errors import RetraceError
from pipeline.stage import StageConfig, StageSpec

SPEC = StageSpec(name="push", reads=("publish.files",), cached=False)


class PushError(RetraceError, RuntimeError):
    """The upload cannot happen; the message says what to do (and never holds the token)."""


class Config(StageConfig):
    repo_id: str | None = Field(None, pattern=r"^[\w.\-]+/[\w.\-]+$")  # "you/retrace-bsafe"
    private: bool = False
    revision: str | None = None  # a branch; created from main when missing
    dry_run: bool = False
    commit_message: str | None = None  # None: names the run
    endpoint: str | None = None  # another Hub deployment; None: HF_ENDPOINT or huggingface.co


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """Every file under the dataset folder (relative path, bytes), in upload order."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise PushError(
            f"push: {folder} is not a published dataset folder (no README.md); "
            "run `retrace stage publish` first"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in files]


def format_plan(plan: list[tuple[str, int]], repo_id: str | None) -> str:
    """The dry-run listing: one file per line with its size, then the total."""
    width = max((len(name) for name, _ in plan), default=0)
    lines = [f"{name:<{width}}  {size:>12,d} B" for name, size in plan]
    total = sum(size for _, size in plan)
    target = repo_id or "(no push.repo_id set)"
    lines.append(f"{len(plan)} files, {total:,d} B would be uploaded to datasets/{target}")
    return "\n".join(lines)


def hub_token() -> str:
    """HF_TOKEN or the saved login's token; a clear failure when neither exists."""
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError(
            "push: no Hugging Face token; set HF_TOKEN or run `hf auth login`, "
            "then rerun (nothing was uploaded)"
        )
    return token


def _commit_message(cfg: Config, run_config: dict[str, Any]) -> str:
    if cfg.commit_message:
        return cfg.commit_message
    name = (run_config.get("run") or {}).get("name", "unnamed")
    return f"retrace: publish run {name}"


def upload(folder: Path, cfg: Config, run_config: dict[str, Any]) -> str:
    """Create the repo (and branch) and upload `folder` in one commit; returns the commit URL."""
    if cfg.repo_id is None:
        raise PushError("push: push.repo_id is not set; pass --repo-id you/name")
    upload_plan(folder)  # fails on a folder that was never published
    token = hub_token()
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=cfg.endpoint, token=token)
    where = f"datasets/{cfg.repo_id}"
    try:
        api.create_repo(cfg.repo_id, repo_type="dataset", private=cfg.private, exist_ok=True)
        if cfg.revision:
            api.create_branch(cfg.repo_id, branch=cfg.revision, repo_type="dataset", exist_ok=True)
        info = api.upload_folder(
            folder_path=folder,
            repo_id=cfg.repo_id,
            repo_type="dataset",
            revision=cfg.revision,
            commit_message=_commit_message(cfg, run_config),
        )
    except hf_errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = {401: "the token is invalid or expired", 403: "the token cannot write there"}
        reason = hint.get(status, _scrub(str(err).splitlines()[0], token))
        raise PushError(f"push: the Hub refused {where} (HTTP {status}): {reason}") from None
    except hf_errors.OfflineModeIsEnabled:
        raise PushError(
            f"push: cannot upload to {where}: HF_HUB_OFFLINE is set; unset it to push, "
            "or use --dry-run"
        ) from None
    except (ConnectionError, TimeoutError, getattr(hf_errors, "HTTPError", OSError)) as err:
        raise PushError(
            f"push: cannot reach the Hub at {api.endpoint} to upload {where} "
            f"({_scrub(str(err), token)}); check the network, or use --dry-run"
        ) from None
    return str(getattr(info, "commit_url", info))


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***")


def run(inputs: dict[str, Any], cfg: Config, env: Any) -> dict[str, pa.Table]:
    folder = Path(inputs["publish.files"])
    if cfg.dry_run:
        env.log(format_plan(upload_plan(folder), cfg.repo_id))
    else:
        env.log(f"push: uploaded {folder} as {upload(folder, cfg, env.run_config)}")
    return {"rejected": records.table([], records.REJECTED)}

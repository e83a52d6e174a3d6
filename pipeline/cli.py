"""The `retrace` command line.

    retrace run [--config F] [--until STAGE] [--force STAGE] [--set k=v] [--from-card CARD]
    retrace stage NAME [--config F] [--force] [--set k=v]
    retrace status [--config F]
    retrace show [--kind bsafe] [-n 3]
    retrace models prepare [--force]
    retrace push --repo-id ID [--private] [--revision R] [--dry-run]
    retrace train [--config F] [--set train.k=v] [--data FOLDER]
    retrace eval [--model CKPT|embedded|HUB_ID] [--suite S] [--baseline] [--set decode.k=v]
    retrace eval --compare DIR DIR...
    retrace chat [--model CKPT|embedded|HUB_ID] [--show visible|raw|both] [--bias RESET=-5]
                 [--guard profanity-check] [--set decode.k=v]
    retrace generate --prompts FILE [--model ...] [--out FILE] [--bias ...] [--guard ...]

A mistake (a `RetraceError`: bad config, a stage out of bounds, a missing file it names) or an
environment failure (disk full, read-only folder, no permission, out of memory, a missing package)
prints one line on stderr (one line per bad config key) and exits non-zero; set RETRACE_DEBUG=1
for the traceback. Anything else is a bug and prints its traceback.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline import config as config_mod
from pipeline import kinds
from pipeline.dag import Pipeline, StageError
from pipeline.errors import RetraceError
from pipeline.progress import console
from stages import DATASET_STAGES, STAGES

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
models_app = typer.Typer(no_args_is_help=True, help="Manage generator models.")
app.add_typer(models_app, name="models")

DEFAULT_CONFIG = Path("configs/default.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: section.key=value (repeatable).")
]


def load_stages(names: Iterable[str] = STAGES) -> dict[str, ModuleType]:
    """The stage modules, in DAG order: what the CLI hands the engine, which imports no stage."""
    return {name: importlib.import_module(f"stages.{name}") for name in names}


# What to do about an environment failure, by errno.
_ENVIRONMENT = {
    errno.ENOSPC: "free space there (or point run.runs_dir / RETRACE_CACHE elsewhere), then rerun",
    errno.EDQUOT: "free space within your quota there, then rerun",
    errno.EROFS: "that file system is read-only; point run.runs_dir elsewhere",
    errno.EACCES: "you lack permission there; fix it or point run.runs_dir elsewhere",
    errno.EPERM: "you lack permission there; fix it or point run.runs_dir elsewhere",
    errno.ENOMEM: "lower the batch or chunk size (generator.batch_size, run.chunk_size)",
    errno.ENOENT: "check the path",
}
_PROJECT = ("pipeline", "stages", "trainer")


def _friendly(fn):
    """Mistakes and environment failures become one line and a non-zero exit; bugs keep their
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except config_mod.ConfigError as err:
            _fail(err, str(err), code=2)
        except RetraceError as err:
            _fail(err, str(err), code=1)
        except MemoryError as err:
            _fail(err, f"out of memory; {_ENVIRONMENT[errno.ENOMEM]}", code=1)
        except OSError as err:
            if err.errno is None and isinstance(err, FileNotFoundError):  # raised with a message
                _fail(err, str(err), code=1)
            if err.errno not in _ENVIRONMENT:
                raise
            where = f": {err.filename}" if err.filename else ""
            reason = err.strerror or str(err)
            _fail(err, f"{reason}{where}; {_ENVIRONMENT[err.errno]}", code=1)
        except ImportError as err:
            # A package that is not installed is the environment; a name missing inside the
            # project is a bug.
            if (err.name or "").split(".")[0] in _PROJECT:
                raise
            _fail(err, str(err), code=1)

    return wrapper


def _fail(err: Exception, message: str, code: int) -> None:
    if os.environ.get("RETRACE_DEBUG"):
        raise err
    notes = "; ".join(getattr(err, "__notes__", ()))
    line = f"{message} ({notes})" if notes else message
    # The message may quote user text ("[bold]", "[/]"): printed as it is, not as markup.
    console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _pipeline(config: Path | None, overrides: list[str] | None, raw: dict | None = None):
    stages = load_stages()
    if raw is not None:
        cfg = config_mod.validate(config_mod.apply_overrides(raw, overrides or []), stages, "card")
    else:
        cfg = config_mod.load(config, stages, overrides or [])
    return Pipeline(cfg, stages)


@app.command()
@_friendly
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    until: Annotated[str, typer.Option(help="Last stage to run.")] = DATASET_STAGES[-1],
    force: Annotated[
        list[str] | None,
        typer.Option(help="Rerun this stage and what depends on it, from scratch."),
    ] = None,
    set_: SetOpt = None,
    from_card: Annotated[
        Path | None, typer.Option(help="Rebuild from the config embedded in a data card.")
    ] = None,
) -> None:
    """Run the pipeline up to --until (publish by default); cached stages are skipped."""
    raw = None
    if from_card is not None:
        from pipeline.card import config_from_card

        raw = config_from_card(from_card)
    pipe = _pipeline(config, set_, raw)
    pipe.run([until], force=set(force or []))
    _print_status(pipe)


@app.command()
@_friendly
def stage(
    name: Annotated[str, typer.Argument(help="Stage to run (its inputs run first if needed).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Rerun it from scratch even if cached.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run one stage and what it needs."""
    pipe = _pipeline(config, set_)
    pipe.run([name], force={name} if force else set())


@app.command()
@_friendly
def status(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None) -> None:
    """Show each stage: fresh, stale, partial or missing, with rows and time."""
    _print_status(_pipeline(config, set_))


def _print_status(pipe: Pipeline) -> None:
    table = Table(title=f"run {pipe.store.root}")
    for col in ("stage", "state", "rows out", "rejected", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "state") else "right")
    colours = {
        "fresh": "green",
        "stale": "yellow",
        "partial": "yellow",
        "running": "cyan",
        "missing": "dim",
    }
    states = pipe.statuses(list(pipe.stages))
    notes = []
    for name in pipe.stages:
        state = states[name]
        manifest = pipe.store.manifest(name) or {}
        rows = ", ".join(
            f"{t} {n}" for t, n in manifest.get("rows_out", {}).items() if t != "files"
        )
        table.add_row(
            name,
            f"[{colours[state]}]{state}[/]",
            rows or "-",
            str(manifest.get("rejected", "-")),
            f"{manifest['seconds']:.1f}" if manifest else "-",
        )
        if (progress := pipe.progress(name, state)) is not None:
            notes.append(f"{name} {state}: {progress}")
    # The table is data: stdout.
    from rich.console import Console

    out = Console()
    out.print(table)
    for line in notes:
        out.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command()
@_friendly
def show(
    kind: Annotated[str, typer.Option(help=f"One of {', '.join(kinds.NAMES)}.")] = "bsafe",
    n: Annotated[int, typer.Option("-n", help="Examples to show.")] = 3,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Print examples of a kind with their segments coloured (harmful red, trained green)."""
    from rich.console import Console

    from pipeline.show import show_rows

    if kind not in kinds.BY_NAME:
        raise typer.BadParameter(f"unknown kind {kind!r}; one of {', '.join(kinds.NAMES)}")
    stage, table = kinds.BY_NAME[kind].table.split(".")
    pipe = _pipeline(config, set_)
    if pipe.store.manifest(stage) is None:
        raise StageError(f"no {stage} output in this run yet; run `retrace stage {stage}` first")
    rows = pipe.store.read(stage, table).slice(0, n).to_pylist()
    show_rows(rows, Console(), n)


@models_app.command("prepare")
@_friendly
def models_prepare(
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
) -> None:
    """Convert the embedded Gemma 3 270M GGUF once into a cached HF folder."""
    from pipeline.models import prepare_embedded

    path = prepare_embedded(force=force)
    print(path)


@app.command()
@_friendly
def push(
    repo_id: Annotated[str, typer.Option(help="Hub dataset repo, e.g. you/retrace-bsafe.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to.")] = None,
    dry_run: Annotated[bool, typer.Option(help="List what would be uploaded.")] = False,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
) -> None:
    """Upload the published dataset folder to the Hugging Face Hub in one commit."""
    overrides = [*(set_ or []), f"push.repo_id={repo_id}", f"push.private={private}"]
    overrides.append(f"push.dry_run={dry_run}")
    if revision:
        overrides.append(f"push.revision={revision}")
    _pipeline(config, overrides).run(["push"])


@app.command()
@_friendly
def train(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="A dataset folder to train on instead of this run's.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if cached.")] = False,
) -> None:
    """Train the bundled trainer on this run's published folder, or on --data FOLDER."""
    # With --data the train stage reads that folder and needs none of this run's stages; its
    # files are in the stage's cache key, so another folder trains from scratch.
    extra = [f"train.data={data.resolve()}"] if data is not None else []
    pipe = _pipeline(config, [*(set_ or []), *extra])
    pipe.run(["train"], force={"train"} if force else set())
    print(pipe.store.files_dir("train") / "final")


@app.command("eval")
@_friendly
def eval_(
    model: Annotated[
        str | None,
        typer.Option(
            help="A checkpoint folder, 'embedded' or a Hub id; default: this run's train."
        ),
    ] = None,
    suite: Annotated[
        list[str] | None, typer.Option(help="Suite to run (repeatable); default: eval.suites.")
    ] = None,
    baseline: Annotated[
        bool, typer.Option(help="Allow a model without control tokens (backtracking 0 by design).")
    ] = False,
    decode: Annotated[list[str] | None, typer.Option(hidden=True)] = None,  # removed: see below
    compare: Annotated[
        bool, typer.Option(help="Compare the eval folders given as arguments instead.")
    ] = False,
    folders: Annotated[
        list[Path] | None, typer.Argument(help="Eval folders for --compare.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where --compare writes its table and plot.")] = Path(
        "."
    ),
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Evaluate again even if cached.")] = False,
) -> None:
    """Evaluate a model (attacks, false triggers, utility) into runs/<run>/eval/<model>/; it
    decodes with the top-level decode: section, as chat and generate do (--set decode.k=v)."""
    if decode:
        raise config_mod.ConfigError(
            f"--decode {decode[0]} was removed: use --set decode.{decode[0]} (the top-level "
            "decode: section, which chat, generate and eval read)"
        )
    if compare:
        from stages.eval_report import compare as compare_folders

        if not folders or len(folders) < 2:
            raise StageError("eval --compare needs two or more eval folders, e.g. runs/x/eval/*")
        print(compare_folders(folders, out), end="")
        return
    overrides = list(set_ or [])
    if model is not None:
        overrides.append(f"eval.model={model}")
    if suite:
        overrides.append(f"eval.suites=[{', '.join(suite)}]")
    if baseline:
        overrides.append("eval.baseline=true")
    pipe = _pipeline(config, overrides)
    pipe.run(["eval"], force={"eval"} if force else set())
    report = pipe.store.files_dir("eval") / "report.md"
    print(report)


# --- decoding: chat and generate (pipeline/decode, pipeline/chat.py) --------------------------

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="A checkpoint folder, 'embedded' or a Hub id.")
]
BiasOpt = Annotated[
    list[str] | None,
    typer.Option("--bias", help="Control-token logit bias, NAME=VALUE (RESET=-5, hate=2)."),
]
GuardOpt = Annotated[
    str | None,
    typer.Option("--guard", help="Scorer-guided rollback with this scorer (profanity-check)."),
]
BackendOpt = Annotated[str, typer.Option(help="transformers or vllm.")]
BatchOpt = Annotated[int, typer.Option(help="Turns decoded together.", min=1)]
DecodeConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (its decode: section).")
]


def _decoder(model, config, set_, bias, guard, backend="transformers", batch_size=1):
    """(decoder, run seed) from the CLI options; the decode: section is validated first."""
    from transformers.utils import logging as hf_logging

    from pipeline.backends import GeneratorSpec, load_generator
    from pipeline.decode import load_decoder

    hf_logging.disable_progress_bar()  # the terminal is the chat's; loading says nothing
    overrides = list(set_ or [])
    for item in bias or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise config_mod.ConfigError(f"--bias {item!r}: expected NAME=VALUE, e.g. RESET=-5")
        overrides.append(f"decode.bias.{name}={value}")
    if guard:
        overrides.append(f"decode.guard.scorer.kind={guard}")
    cfg = config_mod.load(config, load_stages(), overrides)
    spec = GeneratorSpec.model_validate(
        {"backend": backend, "model": model, "batch_size": batch_size}
    )
    return load_decoder(load_generator(spec), cfg.decode), cfg.run.seed


@app.command()
@_friendly
def chat(
    model: ModelOpt = "embedded",
    show: Annotated[str, typer.Option(help="visible, raw or both.")] = "visible",
    bias: BiasOpt = None,
    guard: GuardOpt = None,
    config: DecodeConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Chat with a model in the terminal; edits stay on screen struck through."""
    from rich.console import Console

    from pipeline.chat import chat as run_chat

    if show not in ("visible", "raw", "both"):
        raise config_mod.ConfigError(f"--show {show!r}: expected visible, raw or both")
    decoder, seed = _decoder(model, config, set_, bias, guard)
    run_chat(decoder, Console(), show=show, seed=seed)  # type: ignore[arg-type]


@app.command()
@_friendly
def generate(
    prompts: Annotated[Path, typer.Option(help="JSONL: prompt or messages, id, prefill, seed.")],
    model: ModelOpt = "embedded",
    out: Annotated[Path | None, typer.Option(help="Output JSONL (default: stdout).")] = None,
    bias: BiasOpt = None,
    guard: GuardOpt = None,
    backend: BackendOpt = "transformers",
    batch_size: BatchOpt = 8,
    config: DecodeConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode a file of prompts; one JSONL row per turn (raw, visible, events, tokens)."""
    import json
    import sys

    from pipeline.decode import batch
    from pipeline.progress import bar

    if not prompts.is_file():
        raise FileNotFoundError(f"--prompts {prompts} does not exist; give a JSONL file")
    lines, bad = batch.read_prompts(prompts)  # before the model loads: a bad file fails at once
    for b in bad:
        line = escape(f"{b.where} ({b.reason}): {b.detail}")  # the line's text is not markup
        console.print(f"[yellow]rejected[/] {line}", highlight=False, soft_wrap=True)
    decoder, seed = _decoder(model, config, set_, bias, guard, backend, batch_size)
    requests = batch.requests(lines, seed)
    tmp = out.with_name(out.name + ".tmp") if out else None
    sink = tmp.open("w") if tmp else sys.stdout
    try:
        with bar("generate", len(requests)) as progress:
            for row in batch.generate_rows(decoder, requests, batch_size):
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                progress.advance(1, tokens=row["emitted_tokens"])
    finally:
        if tmp:
            sink.close()
    if tmp and out:
        tmp.replace(out)  # complete files only (docs/architecture.md#run-store)
        console.print(f"wrote {len(requests)} turns to {out}")
    if bad:
        console.print(
            f"{len(bad)} line(s) of {prompts} rejected (listed above); fix and rerun them"
        )

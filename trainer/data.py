"""Read a published dataset folder as a stream of micro-batches, with an exact resume position.

Layout read (written by the publish stage): `<folder>/data/<config>/train-*.parquet` and
`validation-*.parquet`, each with the config's schema from pipeline/records.py. Rows stream from
Parquet in record batches through a per-config shuffle buffer, so memory does not grow with the
corpus. Each epoch takes `weight x rows` of every config (row counts come from Parquet metadata)
and interleaves them at random; every draw is seeded by (seed, epoch, ...) so an epoch replays
exactly. The position after a micro-batch is (epoch, raw rows read before its planning buffer,
micro-batches already taken from that buffer): resuming skips raw rows without tokenising them,
re-plans one buffer and skips the batches already trained.

With `train.per_step` every optimizer step instead takes exactly that many rows of each mixture
component (Qi et al.'s 16 recovery + 64 anchor), each component from its own endless shuffled
stream; a dropped row is replaced by the next one (and counted), so every step holds the requested
rows. The position is then the rows taken from each stream.

`open_folder` checks the whole folder before any training: a missing config, a missing column or
a config with no trainable token fails with one line naming the file and what to do. What publish
hands over beside the shards (`retrace.json`: the recovery draw, the target tokenizer, each
config's control tokens; pipeline/handoff.py) is read by `handed_off`, strictly; the card is
never read. Only the
columns and `meta` fields the trainer reads are checked (COLUMNS, META_FIELDS), so a corpus whose
`meta` holds other fields, or none, trains as well.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import handoff, kinds, seeds
from pipeline.errors import DataError
from trainer import rlbf
from trainer.batching import Batch, collate, plan
from trainer.encode import Doc, Encoder, Recovery, component

COLUMNS = ("id", "kind", "prompt", "segments")
# The meta fields the trainer reads, when there: recovery's redraw, the anchor's generator, and
# the tokenizer rlbf's n and recovery's k were counted in.
META_FIELDS = ("harmful", "k_max", "h_tokens", "generator", "tokenizer")
_READ = (*COLUMNS, "meta")


@dataclass(frozen=True)
class Source:
    config: str
    weight: float
    train: tuple[Path, ...]
    validation: tuple[Path, ...]
    rows: int  # train rows, from Parquet metadata

    @property
    def per_epoch(self) -> int:
        return max(1, round(self.weight * self.rows))


# --- checking the folder -------------------------------------------------------------------------


def open_folder(folder: Path, configs: dict[str, float]) -> list[Source]:
    folder = Path(folder)
    root = folder / "data"
    if not root.is_dir():
        raise DataError(
            f"train: {folder} has no data/ folder; point train.data at a published folder"
        )
    have = sorted(p.name for p in root.iterdir() if p.is_dir())
    sources = []
    for config, weight in configs.items():
        if kinds.is_preference(config):
            raise DataError(
                f"train.configs: {config!r} holds DPO pairs, not SFT rows; train it with "
                "trl.DPOTrainer and drop it from train.configs"
            )
        train = tuple(sorted((root / config).glob("train-*.parquet")))
        if not train:
            raise DataError(
                f"train: config {config!r} has no train-*.parquet under {root}; "
                f"configs there: {', '.join(have) or 'none'}; fix train.configs"
            )
        validation = tuple(sorted((root / config).glob("validation-*.parquet")))
        for f in train + validation:
            _check_schema(f)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in train)
        if not _has_trained_segment(train):
            raise DataError(
                f"train: config {config!r} in {root} has no segment with train=true in its {rows} "
                "rows; nothing to learn — check the format stage's loss flags"
            )
        sources.append(Source(config, weight, train, validation, rows))
    return sources


def _check_schema(path: Path) -> None:
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # a truncated or non-Parquet file
        raise DataError(f"train: cannot read {path}: {e}") from e
    for name, want in _WANT.items():
        if name not in schema.names:
            raise DataError(f"train: {path} has no column {name!r}; not an SFT config of retrace")
        problem = want(schema.field(name).type)
        if problem:
            raise DataError(
                f"train: {path} column {name!r} is {schema.field(name).type}; {problem}"
            )
    if "meta" in schema.names and not pa.types.is_struct(schema.field("meta").type):
        raise DataError(f"train: {path} column 'meta' is {schema.field('meta').type}, not a struct")


def _list_of(*fields: str):
    def check(t: pa.DataType) -> str | None:
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return f"expected a list of {{{', '.join(fields)}}}"
        item = t.value_type
        names = (
            {item.field(i).name for i in range(item.num_fields)}
            if pa.types.is_struct(item)
            else set()
        )
        missing = [f for f in fields if f not in names]
        return f"its items lack {missing}" if missing else None

    return check


def _string(t: pa.DataType) -> str | None:
    return None if pa.types.is_string(t) or pa.types.is_large_string(t) else "expected a string"


_WANT = {
    "id": _string,
    "kind": _string,
    "prompt": _list_of("role", "content"),
    "segments": _list_of("text", "role", "train"),
}


def component_rows(sources: list[Source]) -> Counter:
    """Train rows per mixture component over the configs read (the kind and meta.generator
    columns only)."""
    found: Counter = Counter()
    for src in sources:
        for f in src.train:
            pf = pq.ParquetFile(f)
            columns = [c for c in ("kind", "meta") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                for row in batch.to_pylist():
                    meta = row.get("meta") or {}
                    found[component({"kind": row["kind"], "meta": meta})] += 1
    return found


def handed_off(folder: Path) -> handoff.Handoff:
    """The folder's retrace.json (pipeline/handoff.py); a folder without one is refused."""
    try:
        return handoff.read(folder)
    except handoff.HandoffError as err:
        raise DataError(f"train: {err}") from None


def corpus_controls(handed: handoff.Handoff, sources: list[Source], folder: Path) -> list[str]:
    """Every control-token string the configs read use, as retrace.json lists them, sorted."""
    missing = [s.config for s in sources if s.config not in handed.control_tokens]
    if missing:
        raise DataError(
            f"train: {Path(folder) / handoff.FILE} lists no control_tokens for {missing}; "
            "republish the folder with `retrace stage publish`"
        )
    return sorted({t for s in sources for t in handed.control_tokens[s.config]})


def corpus_text(sources: list[Source]) -> Iterator[str]:
    """The configs' train text (prompt contents, segment texts but control tokens), in file order:
    what a `corpus:<N>` tokenizer is trained on."""
    for src in sources:
        for f in src.train:
            for batch in pq.ParquetFile(f).iter_batches(
                batch_size=1024, columns=["prompt", "segments"]
            ):
                yield from pc.list_flatten(batch.column(0)).field("content").to_pylist()
                segs = pc.list_flatten(batch.column(1))
                keep = pc.not_equal(segs.field("role"), "control")
                yield from pc.filter(segs.field("text"), keep).to_pylist()


def identity(sources: list[Source]) -> str:
    """Content hash of the Parquet files trained on: a checkpoint belongs to this data."""
    h = hashlib.sha256()
    for src in sources:
        for f in (*src.train, *src.validation):
            h.update(f"{src.config}/{f.name}\0".encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def recovery_draw(handed: handoff.Handoff, cfg: Any, folder: Path) -> tuple[Recovery, str]:
    """The recovery redraw's settings: train.recovery where set, else what format drew with
    (retrace.json); and a line saying where they came from."""
    draw = handed.recovery.model_copy(update=cfg.recovery.model_dump(exclude_none=True))
    return draw, (
        f"recovery redraw: P(k=0)={draw.p_zero:g}, cap {draw.k_cap}, separator "
        f"{draw.refusal_separator!r}, from train.recovery where set, else "
        f"{Path(folder) / handoff.FILE} (k counted in {handed.tokenizer or 'no tokenizer'})"
    )


def rlbf_recounts(sources: list[Source], tokenizer: Any) -> str:
    """What re-counting rlbf's n in `tokenizer` (trainer/rlbf.py) does to each config's train
    rows, as one line ("" when no row takes back): rows whose n changed, rows dropped, and the
    tokenizers the rows say they were counted in (meta.tokenizer)."""
    parts = []
    for src in sources:
        seen, changed, dropped, counted_in = 0, 0, Counter(), Counter()
        for row in _file_rows(src.train):
            if not rlbf.takes_back(row["segments"]):
                continue
            seen += 1
            counted_in[row["meta"].get("tokenizer", "unknown")] += 1
            got = rlbf.recount(row["segments"], tokenizer)
            if isinstance(got, str):
                dropped[got] += 1
            else:
                changed += bool(got[1])
        if seen:
            drops = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())) or "none"
            was = ", ".join(f"{t} {n}" for t, n in sorted(counted_in.items()))
            parts.append(
                f"{src.config}: n changed in {changed} of {seen} rows, dropped {drops} "
                f"(counted in meta.tokenizer {was})"
            )
    return "; ".join(parts)


def _has_trained_segment(files: tuple[Path, ...]) -> bool:
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["segments"]):
            flags = pc.list_flatten(batch.column(0)).field("train")
            if pc.any(flags).as_py():
                return True
    return False


# --- streaming rows ------------------------------------------------------------------------------


def _file_rows(files: tuple[Path, ...]) -> Iterator[dict[str, Any]]:
    for f in files:
        pf = pq.ParquetFile(f)
        columns = [c for c in _READ if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                meta = row.get("meta") or {}
                row["meta"] = {k: meta[k] for k in META_FIELDS if meta.get(k) is not None}
                yield row


def _shuffled(rows: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A streaming shuffle: hold `size` rows, emit a random one as each new row arrives."""
    buf: list[dict] = []
    for row in rows:
        if len(buf) < size:
            buf.append(row)
            continue
        i = rng.randrange(size)
        buf[i], row = row, buf[i]
        yield row
    rng.shuffle(buf)
    yield from buf


def _config_stream(src: Source, shuffle: int, seed: int, epoch: int) -> Iterator[dict]:
    """The config's rows, reshuffled on every pass, endless (weights above 1 need repeats)."""
    for cycle in itertools.count():
        rng = seeds.rng(seed, "shuffle", src.config, epoch, cycle)
        yield from _shuffled(_file_rows(src.train), shuffle, rng)


def epoch_rows(
    sources: list[Source], shuffle: int, seed: int, epoch: int
) -> Iterator[tuple[str, dict]]:
    """One epoch: `per_epoch` rows of each config, interleaved uniformly at random."""
    streams = {s.config: _config_stream(s, shuffle, seed, epoch) for s in sources}
    left = {s.config: s.per_epoch for s in sources}
    rng = seeds.rng(seed, "interleave", epoch)
    total = sum(left.values())
    while total:
        config = _pick(left, rng.randrange(total))
        left[config] -= 1
        total -= 1
        yield config, next(streams[config])


def _pick(left: dict[str, int], r: int) -> str:
    """The config holding draw r of the rows still left (each config owns `left` of them)."""
    for config, n in left.items():
        if r < n:
            return config
        r -= n
    raise AssertionError("draw beyond the rows left")


# --- micro-batches -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    row: int = 0  # raw rows of the epoch read before the current planning buffer
    batch: int = 0  # micro-batches already taken from that buffer
    taken: dict[str, int] = field(default_factory=dict)  # per_step: rows read per component


@dataclass
class Step:
    """One optimizer step's micro-batches, the position after it and what it holds."""

    position: Position
    batches: list[Batch]
    rows: Counter  # documents per component
    tokens: Counter  # trained tokens per component


def _step(position: Position, docs_batches: list[tuple[list[list[Doc]], Batch]]) -> Step:
    rows, tokens = Counter(), Counter()
    for rows_of_docs, _ in docs_batches:
        for doc in (d for r in rows_of_docs for d in r):
            rows[doc.component] += 1
            tokens[doc.component] += sum(doc.trained[1:])
    return Step(position, [b for _, b in docs_batches], rows, tokens)


def train_steps(
    sources: list[Source],
    encoder: Encoder,
    cfg: Any,
    seed: int,
    start: Position,
    counts: Counter,
) -> Iterator[Step]:
    """Endless optimizer steps from `start`. `counts` gathers drops and cuts ("config:reason")."""
    if cfg.per_step:
        yield from _stratified(sources, encoder, cfg, seed, start, counts)
        return
    batches = train_batches(sources, encoder, cfg, seed, start, counts)
    while True:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        yield _step(micro[-1][0], [(docs, b) for _, docs, b in micro])


def train_batches(
    sources: list[Source],
    encoder: Encoder,
    cfg: Any,
    seed: int,
    start: Position,
    counts: Counter,
) -> Iterator[tuple[Position, list[list[Doc]], Batch]]:
    """Endless micro-batches from `start`, each with the position just after it."""
    pad = encoder.tok.pad_token_id
    width = cfg.max_length if cfg.pack and cfg.compile else None  # one shape: no recompiles
    epoch = start.epoch
    while True:
        yielded = False
        rows = epoch_rows(sources, cfg.shuffle_buffer, seed, epoch)
        skip = start.row if epoch == start.epoch else 0
        for _ in range(skip):  # resume: raw rows, not tokenised
            next(rows)
        row0 = skip
        while True:
            raw = [r for _, r in zip(range(cfg.buffer_rows), rows, strict=False)]
            if not raw:
                break
            first = start.batch if (epoch, row0) == (start.epoch, start.row) else 0
            # A buffer re-planned on resume had its drops counted before the checkpoint.
            count = counts if first == 0 else Counter()
            docs = [
                d
                for config, row in raw
                if (d := _encode(encoder, row, config, seed, epoch, cfg, count)) is not None
            ]
            rng = seeds.rng(seed, "plan", epoch, row0)
            batches = plan(docs, cfg.batch_size, cfg.max_length, cfg.pack, rng)
            for i in range(first, len(batches)):
                yielded = True
                yield Position(epoch, row0, i + 1), batches[i], collate(batches[i], pad, width)
            row0 += len(raw)
        resumed_late = epoch == start.epoch and (start.row or start.batch)
        if not yielded and not resumed_late:
            raise DataError(f"train: every row of epoch {epoch} was dropped ({dict(counts)})")
        epoch += 1


def _encode(encoder, row, config, seed, epoch, cfg, counts: Counter) -> Doc | None:
    doc = encoder.encode(row, config, (seed, epoch) if cfg.redraw_k else None)
    if isinstance(doc, str):
        counts[f"{config}:{doc}"] += 1
        return None
    if doc.cut:
        counts[f"{config}:cut_to_max_length"] += 1
    return doc


def _component_stream(
    sources: list[Source], name: str, shuffle: int, seed: int
) -> Iterator[tuple[int, str, dict]]:
    """(pass, config, row) for every row of component `name`, reshuffled on every pass, endless."""
    for cycle in itertools.count():
        rng = seeds.rng(seed, "shuffle", name, cycle)
        rows = (
            (src.config, r)
            for src in sources
            for r in _file_rows(src.train)
            if component(r) == name
        )
        found = False
        for config, r in _shuffled(rows, shuffle, rng):
            found = True
            yield cycle, config, r
        if not found:
            configs = ", ".join(src.config for src in sources)
            raise DataError(
                f"train.per_step names {name!r}, but no row of {configs} is of that component; "
                "fix train.per_step or train.configs"
            )


def _stratified(
    sources: list[Source], encoder: Encoder, cfg: Any, seed: int, start: Position, counts: Counter
) -> Iterator[Step]:
    pad = encoder.tok.pad_token_id
    width = cfg.max_length if cfg.pack and cfg.compile else None
    taken = dict(start.taken)
    streams = {}
    for name in cfg.per_step:
        streams[name] = _component_stream(sources, name, cfg.shuffle_buffer, seed)
        for _ in range(taken.get(name, 0)):  # resume: raw rows, not tokenised
            next(streams[name])
    passes: dict[str, int] = {}
    while True:
        docs: list[Doc] = []
        for name, want in cfg.per_step.items():
            got, tries = 0, 0
            while got < want:
                cycle, config, row = next(streams[name])
                passes[name] = cycle
                taken[name] = taken.get(name, 0) + 1
                tries += 1
                doc = _encode(encoder, row, config, seed, cycle, cfg, counts)
                if doc is not None:
                    docs.append(doc)
                    got += 1
                elif tries > 100 * want and not got:
                    raise DataError(
                        f"train: {tries} {name} rows in a row were dropped ({dict(counts)})"
                    )
        rng = seeds.rng(seed, "plan", "per_step", *sorted(taken.items()))
        batches = plan(docs, cfg.batch_size, cfg.max_length, cfg.pack, rng)
        position = Position(epoch=min(passes.values()), taken=dict(taken))
        yield _step(position, [(b, collate(b, pad, width)) for b in batches])


def eval_batches(src: Source, encoder: Encoder, cfg: Any) -> list[Batch]:
    """The first `eval_rows` validation rows of a config, as published (no redraw), unpacked."""
    docs = []
    rows = _file_rows(src.validation)
    for row in (r for _, r in zip(range(cfg.eval_rows), rows, strict=False)):
        doc = encoder.encode(row, src.config)
        if isinstance(doc, Doc):
            docs.append(doc)
    batches = plan(docs, cfg.batch_size, cfg.max_length, False, None)
    return [collate(b, encoder.tok.pad_token_id) for b in batches]

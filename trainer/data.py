"""Read a published dataset folder as a stream of micro-batches, with an exact resume position.

Layout read (written by the publish stage): `<folder>/data/<config>/train-*.parquet` and
`validation-*.parquet`, each with the config's schema from pipeline/records.py. Rows stream from
Parquet in record batches through a per-config shuffle buffer, so memory does not grow with the
corpus. Each epoch takes `weight x rows` of every config (row counts come from Parquet metadata)
and interleaves them at random; every draw is seeded by (seed, epoch, ...) so an epoch replays
exactly. The position after a micro-batch is (epoch, raw rows read before its planning buffer,
micro-batches already taken from that buffer): resuming skips raw rows without tokenising them,
re-plans one buffer and skips the batches already trained.

`open_folder` checks the whole folder before any training: a missing config, a wrong schema or a
config with no trainable token fails with one line naming the file and what to do.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import records, seeds
from pipeline.errors import RetraceError
from trainer.batching import Batch, collate, plan
from trainer.encode import Doc, Encoder

COLUMNS = ("id", "kind", "prompt", "segments", "meta")


class DataError(RetraceError, ValueError):
    """The dataset folder cannot be trained on; the message says why and what to do."""


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
        if config == "preference":
            raise DataError(
                "train.configs: 'preference' holds DPO pairs, not SFT rows; train it with "
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
    for name in COLUMNS:
        want = records.SFT.field(name).type
        if name not in schema.names:
            raise DataError(f"train: {path} has no column {name!r}; not an SFT config of retrace")
        got = schema.field(name).type
        if got != want:
            raise DataError(f"train: {path} column {name!r} is {got}, expected {want}")


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
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=list(COLUMNS)):
            yield from batch.to_pylist()


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


def train_batches(
    sources: list[Source],
    encoder: Encoder,
    cfg: Any,
    seed: int,
    start: Position,
    dropped: Counter,
) -> Iterator[tuple[Position, Batch]]:
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
            count = dropped if first == 0 else Counter()
            docs: list[Doc] = []
            for config, row in raw:
                doc = encoder.encode(row, config, (seed, epoch) if cfg.redraw_k else None)
                if isinstance(doc, str):
                    count[f"{config}:{doc}"] += 1
                else:
                    docs.append(doc)
            rng = seeds.rng(seed, "plan", epoch, row0)
            batches = plan(docs, cfg.batch_size, cfg.max_length, cfg.pack, rng)
            for i in range(first, len(batches)):
                yielded = True
                yield Position(epoch, row0, i + 1), collate(batches[i], pad, width)
            row0 += len(raw)
        resumed_late = epoch == start.epoch and (start.row or start.batch)
        if not yielded and not resumed_late:
            raise DataError(f"train: every row of epoch {epoch} was dropped ({dict(dropped)})")
        epoch += 1


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

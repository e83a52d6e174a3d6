"""publish: the dataset folder, laid out as a Hugging Face dataset repo, and its card.

Reads blend's tables (one per config, each with a `split` column, and blend.report), every
upstream stage's rejected table (for the card's rejection counts) and the judges tables of the
stages whose scorers judge texts (for the card's judge agreement). Writes no tables; writes into
env.workdir:

    README.md                                   the data card (pipeline/card.py)
    retrace.json                                what the trainer reads (pipeline/handoff.py)
    data/<config>/<split>-NNNNN-of-MMMMM.parquet  shards cut at ~shard_bytes compressed
    images/*.png                                policy mix, k histogram, lengths, toxicity,
                                                judges (with several judges on a gate)

Each shard is written with its config's schema from pipeline/records.py (never inferred), one row
group at a time through a ParquetWriter, so memory stays bounded by a row group whatever the
dataset size. There are no timestamps in shards, plots or card: the same inputs give the same
bytes. It rejects nothing: a row blend kept is published.

Nothing published names a path of the machine that built it (it is pushed to the Hub): a row's
`source`, `meta.generator` and `meta.tokenizer` (a Hub id, or a local file or folder as the config
named it) and the card's config go through `card.portable`, the one rule for a local path.

The card embeds the run config, and the cache key covers what it embeds (`embedded_config`), so a
changed value anywhere in it (a `train.*` setting, say) republishes the card rather than leaving a
stale one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipeline import agreement, card, handoff, kinds, records
from pipeline.stage import StageConfig, StageSpec
from pipeline.versions import versions
from stages import DATASET_STAGES
from stages import publish_tokenized as tokenized

UPSTREAM = DATASET_STAGES[: DATASET_STAGES.index("publish")]
# the stages whose scorers judge texts (a `judges` table)
JUDGED = ("filter", "inject", "natural", "rewrite")
SPEC = StageSpec(
    name="publish",
    reads=(
        *(f"blend.{c}" for c in records.CONFIGS),
        "blend.report",
        *(f"{s}.rejected" for s in UPSTREAM),
        *(f"{s}.judges" for s in JUDGED),
    ),
    required=("blend.mixture",),
    hooks=("external_files", "fingerprints", "embedded_config"),
)
DEFAULT_CONFIG = "mixture"
# The configs that get `<config>-tok` twins: every kind's that has one, and the mixture.
TWINNED = (*(k for k in kinds.NAMES if kinds.BY_NAME[k].tokenized), "mixture")
RECIPE_SECTIONS = ("sample", "filter", "inject", "natural", "rewrite", "format", "blend")
VERSIONED = ("retrace", "datasets", "pyarrow", "transformers", "torch", "trl", "huggingface_hub")
# Sections the card leaves out: they act on the published folder or a trained model afterwards
# (where it is uploaded, how models are evaluated and served). In the card, and so in the key,
# a push or eval change would republish the folder and, through its hash, retrain on it.
NOT_EMBEDDED = ("push", "eval", "decode")
# Row columns that name a model or a data file as the config did: a Hub id, or a local path.
PROVENANCE = ("source", "meta.generator", "meta.tokenizer")

# A row group holds at most this much uncompressed data: small enough that a reader (and the
# Hub's dataset viewer) can fetch one at a time, large enough for zstd to compress well.
ROW_GROUP_BYTES = 64 * 1024 * 1024


class Config(StageConfig):
    # Compressed bytes per shard before the next one starts (the cut falls after a row group).
    shard_bytes: int = Field(256_000_000, gt=0)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    pretty_name: str = "retrace backtracking safety corpus"
    language: list[str] = ["en"]
    # Tokenizers (embedded, a Hub id or a folder) to publish every SFT config pre-tokenized
    # with, as `<config>-tok`: what TRL trains exactly (stages/publish_tokenized.py).
    tokenized: list[str] = []
    # Cut pages by content, so a republished revision shares most bytes with the last one on the
    # Hub's Xet storage (less to upload); it costs 15-20% more write time (pyarrow >= 21).
    content_defined_chunking: bool = False

    @field_validator("content_defined_chunking")
    @classmethod
    def _cdc_supported(cls, on: bool) -> bool:
        if on and int(pa.__version__.split(".")[0]) < 21:
            raise ValueError(f"needs pyarrow >= 21 (installed: {pa.__version__}); set it false")
        return on


def external_files(cfg: Config) -> list[Path]:
    """The card's code and template, and with tokenized configs the trainer's encoder and the
    control tokens: changing any changes the published folder, so all go into the cache key."""
    files = [Path(card.__file__), card.CARD_DIR / card.TEMPLATE]
    if cfg.tokenized:
        from pipeline import taxonomy

        trainer = Path(__file__).resolve().parents[1] / "trainer"
        files += [Path(tokenized.__file__), trainer / "encode.py", trainer / "tokens.py"]
        files.append(taxonomy.TAXONOMY_FILE)
    return files


def fingerprints(cfg: Config) -> list[dict[str, Any]]:
    """Each tokenizer of `tokenized` defines the ids: its identity belongs in the cache key."""
    from pipeline.models import fingerprint

    return [fingerprint(t) for t in cfg.tokenized]


def embedded_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run config the card embeds, and so publish's key covers: every section but those of
    NOT_EMBEDDED, less where the run folder lives (`run.runs_dir`: a rebuild from the card runs
    in that machine's folder), local paths made portable."""
    config = {k: v for k, v in run_config.items() if k not in NOT_EMBEDDED}
    if isinstance(config.get("run"), dict):
        config["run"] = {k: v for k, v in config["run"].items() if k != "runs_dir"}
    return card.portable(config)


def portable_rows(table: pa.Table) -> pa.Table:
    """`table` with each PROVENANCE column's local paths made portable (card.portable), mapped
    once per distinct value, chunk by chunk (no copy of the rest of `meta`); a table that names
    no local path comes back as it is."""

    def mapped(values: pa.Array, names: dict[str, str]) -> pa.Array:
        keys = pa.array(list(names), pa.string())
        return pa.array(list(names.values()), pa.string()).take(pc.index_in(values, keys))

    def renames(column: pa.ChunkedArray) -> dict[str, str]:
        distinct = [v for v in pc.unique(column).to_pylist() if v is not None]
        return {v: card.portable(v) for v in distinct}

    source = renames(table.column("source"))
    meta = table.column("meta")
    fields = list(meta.type)
    inner = {
        f.name: renames(pc.struct_field(meta, f.name))
        for f in fields
        if f"meta.{f.name}" in PROVENANCE
    }
    if all(k == v for names in (source, *inner.values()) for k, v in names.items()):
        return table

    def portable_meta(chunk: pa.StructArray) -> pa.StructArray:
        children = [
            mapped(child, inner[f.name]) if f.name in inner else child
            for f, child in zip(fields, chunk.flatten(), strict=True)
        ]
        return pa.StructArray.from_arrays(children, fields=fields, mask=chunk.is_null())

    column = pa.chunked_array(
        [mapped(c, source) for c in table.column("source").chunks], pa.string()
    )
    table = table.set_column(table.schema.get_field_index("source"), "source", column)
    column = pa.chunked_array([portable_meta(c) for c in meta.chunks], meta.type)
    return table.set_column(table.schema.get_field_index("meta"), "meta", column)


# --- shards ----------------------------------------------------------------------------------


def write_shards(
    table: pa.Table, schema: pa.Schema, folder: Path, split: str, cfg: Config
) -> list[Path]:
    """`table` as `<split>-NNNNN-of-MMMMM.parquet` files in `folder`, each cut once its
    compressed size reaches cfg.shard_bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    table = table.select(schema.names).cast(schema)
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    group_rows = max(1, min(ROW_GROUP_BYTES, cfg.shard_bytes) // per_row)
    options: dict[str, Any] = {
        "compression": cfg.compression,
        "write_statistics": ["id", "kind", "source", "license"],  # not on long text columns
        # Nearly every column is unique text (ids, prompts, completions): Arrow would build a
        # dictionary per column chunk only to fall back to plain pages. Off is 10% of a plain
        # write faster and, under zstd, no larger (40.3 vs 40.9 MB at 128K rows).
        "use_dictionary": False,
    }
    if cfg.content_defined_chunking:
        options["use_content_defined_chunking"] = True
    parts: list[Path] = []
    writer, sink = None, None
    for start in range(0, table.num_rows, group_rows):
        if writer is None:
            parts.append(folder / f".{split}-{len(parts):05d}.partial")
            sink = pa.OSFile(str(parts[-1]), "wb")
            writer = pq.ParquetWriter(sink, schema, **options)
        writer.write_table(table.slice(start, group_rows), row_group_size=group_rows)
        if sink.tell() >= cfg.shard_bytes:
            writer.close()
            sink.close()
            writer = None
    if writer is not None:
        writer.close()
        sink.close()
    final = []
    for i, part in enumerate(parts):
        final.append(folder / f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        part.rename(final[-1])
    return final


def _split_rows(table: pa.Table, split: str) -> pa.Table:
    """The rows of one split; blend writes each split as one block, so this is a slice."""
    idx = np.flatnonzero(pc.equal(table.column("split"), split).to_numpy(zero_copy_only=False))
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx):
        return table.slice(int(idx[0]), len(idx))
    return table.take(pa.array(idx, pa.int64()))


# --- numbers for the card ----------------------------------------------------------------------

# Most to least permissive; a source licence not listed makes the card's licence "other".
_LICENSE_RANK = {
    "cc0-1.0": 0,
    "pddl": 0,
    "unlicense": 0,
    "mit": 1,
    "apache-2.0": 1,
    "bsd-2-clause": 1,
    "bsd-3-clause": 1,
    "odc-by": 2,
    "cc-by-3.0": 2,
    "cc-by-4.0": 2,
    "cc-by-sa-3.0": 3,
    "cc-by-sa-4.0": 3,
    "cc-by-nc-3.0": 4,
    "cc-by-nc-4.0": 4,
    "cc-by-nc-sa-3.0": 5,
    "cc-by-nc-sa-4.0": 5,
    "cc-by-nc-nd-4.0": 6,
}


def most_restrictive(licenses: Iterable[str]) -> str:
    """The Hub licence id covering every row: the most restrictive source licence (BeaverTails
    and Alpaca are CC BY-NC 4.0), or "other" when one is unknown. "a AND b" counts as both."""
    ids = {i for value in licenses for i in records.license_expr(value).split(" AND ") if i}
    if not ids or not ids <= _LICENSE_RANK.keys():
        return "other"
    return max(sorted(ids), key=_LICENSE_RANK.__getitem__)


def _size_category(rows: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")]
    bounds += [(1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]
    return next((name for bound, name in bounds if rows < bound), "10M<n<100M")


def _count(table: pa.Table, keys: list[str]) -> list[dict[str, Any]]:
    if table.num_rows == 0:
        return []
    grouped = table.group_by(keys).aggregate([([], "count_all")]).to_pylist()
    rows = [{**{k: r[k] for k in keys}, "rows": r["count_all"]} for r in grouped]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))


def _origins(tables: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """Rows of each kind with an `origin` (bsafe, rlbf) per origin of their harmful span
    (meta.origin), every origin listed, so a run without natural violations says 0 rather than
    nothing."""
    rows = []
    for kind in (n for n in kinds.NAMES if kinds.BY_NAME[n].origin):
        origin = pc.struct_field(tables[kind].column("meta"), "origin")
        for name in records.ORIGINS:
            n = pc.sum(pc.equal(origin, name)).as_py() or 0
            rows.append({"config": kind, "origin": name, "rows": n})
    return rows


def _chars(messages: pa.ChunkedArray) -> list[int]:
    """Characters per row over a message list's contents, counted in place (no text copy)."""
    arr = messages.combine_chunks()
    per_message = pc.utf8_length(arr.values.field("content")).fill_null(0)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    values = per_message.to_numpy(zero_copy_only=False)[arr.offsets[0].as_py() :][: len(parents)]
    return np.bincount(parents, weights=values, minlength=len(arr)).astype(np.int64).tolist()


def _toxicity(tables: list[pa.Table]) -> tuple[list[float], list[float]]:
    """Per row, the highest score on the harmful spans (labels `span.*`, before backtracking)
    and on what replaced them (every other label: replacements, refusals, safe responses)."""
    before, after = [], []
    for table in tables:
        scores = table.column("meta").combine_chunks().field("scores")
        flat = pc.list_flatten(scores)
        if len(flat) == 0:
            continue
        rows = pc.list_parent_indices(scores).to_numpy(zero_copy_only=False)
        value = flat.field("score").to_numpy(zero_copy_only=False)
        is_span = pc.starts_with(flat.field("label"), "span.").to_numpy(zero_copy_only=False)
        for mask, out in ((is_span, before), (~is_span, after)):
            # Parent indices ascend, so each row's scores are one run: reduce per run.
            row, val = rows[mask], value[mask]
            if len(row):
                starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
                out.extend(np.round(np.maximum.reduceat(val, starts), 6).tolist())
    return before, after


def _example(table: pa.Table, kind: str) -> dict[str, Any] | None:
    if table.num_rows == 0:
        return None
    row = table.slice(0, 1).to_pylist()[0]
    prompt = "\n\n".join(f"[{m['role']}] {m['content']}" for m in row["prompt"])
    if kinds.is_preference(kind):
        texts = [
            ("Chosen", row["chosen"][0]["content"]),
            ("Rejected", row["rejected"][0]["content"]),
        ]
        segments = None
    else:
        texts = [
            ("Completion (what the model is trained to emit)", row["completion"][0]["content"]),
            ("Visible (what a user sees)", row["visible"]),
        ]
        # One segment per line: readable, and exact (JSON strings keep every space).
        lines = [json.dumps(seg, ensure_ascii=False) for seg in row["segments"]]
        segments = "[\n  " + ",\n  ".join(lines) + "\n]"
    return {
        "kind": kind,
        "id": row["id"],
        "source": row["source"],  # made portable with the rows
        "prompt": prompt,
        "texts": texts,
        "segments": segments,
    }


def _scorers(run_config: dict[str, Any]) -> dict[str, Any]:
    return {
        section: body["scorer"]
        for section, body in run_config.items()
        if isinstance(body, dict) and body.get("scorer") is not None
    }


def _judges(inputs: dict[str, Any], run_config: dict[str, Any]) -> dict[str, Any]:
    """Each gate's judges and their agreement (pipeline/agreement.py), and how its verdict
    combines them, for the gates with several judges."""
    summary = agreement.summarise({s: inputs[f"{s}.judges"].to_pylist() for s in JUDGED})
    several = list(dict.fromkeys(p["gate"] for p in summary["pairs"]))
    agree = [{"gate": g, "agree": (run_config.get(g) or {}).get("agree", "any")} for g in several]
    return {**summary, "agree": agree}


def _header(configs: list[dict], license_id: str, total: int, cfg: Config) -> dict[str, Any]:
    """The card's YAML header: `configs` lets datasets.load_dataset(folder, name) find each
    config's shards by split."""
    header = {
        "pretty_name": cfg.pretty_name,
        "license": license_id,
        "language": list(cfg.language),
        "task_categories": ["text-generation"],
        "tags": ["safety", "alignment", "backtracking", "synthetic", "sft", "dpo", "trl"],
        "size_categories": [_size_category(total)],
        "configs": [
            {
                "config_name": c["name"],
                **({"default": True} if c["name"] == DEFAULT_CONFIG else {}),
                "data_files": [
                    {"split": s["split"], "path": f"data/{c['name']}/{s['split']}-*.parquet"}
                    for s in c["splits"]
                ],
            }
            for c in configs
        ],
    }
    if license_id == "other":
        header["license_name"] = "mixed: see the licences table"
    return header


def _plots(
    tables: dict[str, pa.Table], policy_mix: dict, votes: dict, images_dir: Path
) -> dict[str, str]:
    lengths = {
        k: _chars(tables[k].column("chosen" if kinds.is_preference(k) else "completion"))
        for k in kinds.NAMES
    }
    ks = [
        k
        for k in pc.struct_field(tables["recovery"].column("meta"), "k").to_pylist()
        if k is not None
    ]
    # The SFT rows format wrote (its preference pairs repeat their reset rows' scores).
    recipes = [k for k in kinds.built_by("format") if not kinds.is_preference(k)]
    before, after = _toxicity([tables[k] for k in recipes])
    plots = {
        "policy_mix": card.plot_policy_mix(policy_mix, images_dir / "policy_mix.png"),
        "k_histogram": card.plot_k_histogram(ks, images_dir / "k_histogram.png"),
        "lengths": card.plot_lengths(lengths, images_dir / "lengths.png"),
        "toxicity": card.plot_toxicity(before, after, images_dir / "toxicity.png"),
    }
    if votes["pairs"]:  # one judge per gate: nothing to compare, and the card says so
        plots["judges"] = card.plot_judges(votes, images_dir / "judges.png")
    return plots


def _context(
    inputs: dict[str, Any], configs: list[dict], empty: list[str], cfg: Config, env: Any
) -> dict[str, Any]:
    tables = {name: inputs[f"blend.{name}"] for name in records.CONFIGS}
    per_kind = [tables[k] for k in kinds.NAMES]
    report = inputs["blend.report"]
    column = pa.chunked_array([t.column("license") for t in per_kind], pa.string())
    # Counted by normalised expression, so "apache-2.0 AND Apache-2.0" is one "apache-2.0" row.
    distinct = column.unique()
    normal = pa.array([records.license_expr(v) for v in distinct.to_pylist()], pa.string())
    license_counts = _count(
        pa.table({"license": normal.take(pc.index_in(column, value_set=distinct))}), ["license"]
    )
    policy_rows, policy_mix = [], {}
    for kind in kinds.NAMES:
        flat = pc.list_flatten(tables[kind].column("policy"))
        counts = _count(pa.table({"policy": flat}), ["policy"])
        policy_rows += [{"config": kind, **r} for r in counts]
        if counts:
            policy_mix[kind] = {r["policy"]: r["rows"] for r in counts}
    rejected = pa.concat_tables(
        inputs[f"{s}.rejected"].select(records.REJECTED.names).cast(records.REJECTED)
        for s in UPSTREAM
    )
    stage_order = {s: i for i, s in enumerate(UPSTREAM)}
    rejections = sorted(
        _count(rejected, ["stage", "reason"]),
        key=lambda r: (stage_order.get(r["stage"], 99), r["reason"]),
    )
    meta = pa.concat_arrays([t.column("meta").combine_chunks() for t in per_kind])
    generators = _count(
        pa.table(
            {
                "generator": pc.fill_null(meta.field("generator"), "(none: source data)"),
                "backend": pc.fill_null(meta.field("backend"), "-"),
            }
        ),
        ["generator", "backend"],
    )
    steps = ("invalid", "exact_dedup", "near_dedup", "decontaminate")
    report_rows = report.to_pylist()
    total = sum(t.num_rows for t in per_kind)
    license_id = most_restrictive(r["license"] for r in license_counts)
    header = _header(configs, license_id, total, cfg)
    examples = [_example(tables[k], k) for k in kinds.NAMES]  # blend puts train rows first
    # No absolute local path reaches the card: the rows' provenance was made portable in run,
    # and the config is the portable one the key covers.
    run_config = embedded_config(env.run_config)
    votes = _judges(inputs, run_config)
    return {
        "header": header,
        "run_name": (run_config.get("run") or {}).get("name", "unnamed"),
        "default_config": DEFAULT_CONFIG
        if any(c["name"] == DEFAULT_CONFIG for c in configs)
        else (configs[0]["name"] if configs else DEFAULT_CONFIG),
        "configs": configs,
        "kinds": [kinds.BY_NAME[k] for k in kinds.NAMES],  # the Configs table
        "empty_configs": empty,
        "mixture_kinds": _count(tables["mixture"], ["kind", "split"]),
        "pairs": _count(
            pa.table(
                {
                    "pair": pc.fill_null(
                        pc.struct_field(tables["preference"].column("meta"), "pair"), "-"
                    ),
                    "split": tables["preference"].column("split"),
                }
            ),
            ["pair", "split"],
        ),
        "ratios": [r for r in report_rows if r["step"] == "mixture"],
        "origins": _origins(tables),
        "toxic_samples": sum(
            r["rows"] for r in rejections if (r["stage"], r["reason"]) == ("filter", "toxic")
        ),
        "natural_rejections": [r for r in rejections if r["stage"] == "natural"],
        "policies": policy_rows,
        "licenses": license_counts,
        "license_note": (
            "Generated text (anchor answers, rewrites) also falls under the generator's terms of "
            "use; see the generator table."
        ),
        "rejections": rejections,
        "blend_steps": [r for r in report_rows if r["step"] in steps and r["removed"]],
        "generators": generators,
        "scorers": _scorers(run_config),
        "judges": votes,
        "images": _plots(tables, policy_mix, votes, env.workdir / "images"),
        "examples": [e for e in examples if e is not None],
        # The tokenizer(s) rlbf's [BACKTRACK_BY_<n>] counts: rendering those rows needs it.
        "rlbf_tokenizers": sorted(
            {
                t
                for t in pc.struct_field(tables["rlbf"].column("meta"), "tokenizer").to_pylist()
                if t
            }
        ),
        "recipe": {s: run_config[s] for s in RECIPE_SECTIONS if s in run_config},
        "versions": list(versions(VERSIONED).items()),
        "run_config": run_config,
    }


def _publish_config(
    name: str, table: pa.Table, schema: pa.Schema, out: Path, cfg: Config, env: Any
) -> list[dict[str, Any]]:
    """Shards of one config per split; the card's counts for each split written."""
    splits = []
    for split in records.SPLITS:
        rows = _split_rows(table, split)
        if rows.num_rows == 0:
            continue
        files = write_shards(rows, schema, out / "data" / name, split, cfg)
        size = sum(f.stat().st_size for f in files)
        splits.append({"split": split, "rows": rows.num_rows, "shards": len(files), "bytes": size})
        env.log(f"publish: {name}/{split}: {rows.num_rows} rows in {len(files)} shard(s)")
    return splits


def _tokenized(
    inputs: dict[str, Any], sft: list[str], out: Path, cfg: Config, env: Any
) -> tuple[list[dict], list[dict], list[dict]]:
    """Each tokenizer's `<config>-tok` twins and tokenizer folder: (configs, card entries,
    rejected rows)."""
    from pipeline.models import model_id

    configs, entries, rejected = [], [], []
    for source, (suffix, folder) in zip(cfg.tokenized, tokenized.names(cfg.tokenized), strict=True):
        enc = tokenized.encoder(source)
        tokenized.save_tokenizer(enc, out / folder)
        names, dropped = [], 0
        for name in sft:
            table, refused = tokenized.encode(inputs[f"blend.{name}"], name, enc)
            rejected += refused
            dropped += len(refused)
            splits = _publish_config(f"{name}-{suffix}", table, records.TOKENIZED, out, cfg, env)
            if splits:
                configs.append({"name": f"{name}-{suffix}", "splits": splits})
                names.append(f"{name}-{suffix}")
        entries.append(
            {
                # a local folder is named as the card names any (no machine paths on the Hub)
                "source": card.portable(source),
                "model": card.portable(model_id(source)),
                "suffix": suffix,
                "folder": folder,
                "configs": names,
                "dropped": dropped,
            }
        )
    return configs, entries, rejected


def handed_off(
    inputs: dict[str, Any], configs: list[dict], run_config: dict[str, Any]
) -> handoff.Handoff:
    """retrace.json's contents: format's recovery draw and target tokenizer (its keys, from the
    resolved run config), and the control tokens of each published config with segments."""
    from pipeline.models import model_id

    fmt = run_config["format"]
    with_segments = [
        c["name"] for c in configs if "segments" in records.config_schema(c["name"]).names
    ]
    return handoff.Handoff(
        recovery=handoff.Recovery.model_validate(
            {k: fmt[k] for k in handoff.Recovery.model_fields}
        ),
        tokenizer=card.portable(model_id(fmt["target_tokenizer"], fmt["target_revision"])),
        control_tokens={c: handoff.control_tokens(inputs[f"blend.{c}"]) for c in with_segments},
    )


def run(inputs: dict[str, Any], cfg: Config, env: Any) -> dict[str, pa.Table]:
    out = Path(env.workdir)
    # A resumed attempt gets the same folder back: clear what an earlier attempt wrote.
    for stale in ("data", "images", *(f for _, f in tokenized.names(cfg.tokenized))):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "README.md").unlink(missing_ok=True)
    (out / handoff.FILE).unlink(missing_ok=True)
    # Every published byte (shards, -tok twins, the card's counts) comes from portable rows.
    inputs = {
        **inputs,
        **{f"blend.{c}": portable_rows(inputs[f"blend.{c}"]) for c in records.CONFIGS},
    }
    configs, empty = [], []
    for name in records.CONFIGS:
        table, schema = inputs[f"blend.{name}"], records.config_schema(name)
        splits = _publish_config(name, table, schema, out, cfg, env)
        if splits:
            configs.append({"name": name, "splits": splits})
        else:
            empty.append(name)
    sft = [c["name"] for c in configs if c["name"] in TWINNED]
    tok_configs, tok_entries, rejected = (
        _tokenized(inputs, sft, out, cfg, env) if cfg.tokenized else ([], [], [])
    )
    handoff.write(out, handed_off(inputs, configs, env.run_config))
    context = _context(inputs, configs + tok_configs, empty, cfg, env)
    text = card.render_card({**context, "tokenized": tok_entries})
    (out / "README.md").write_text(text, encoding="utf-8")
    return {"rejected": records.table(rejected, records.REJECTED)}

"""blend: the recipe examples plus utility data, deduplicated, decontaminated, split and mixed.

Reads every kind's tables (pipeline/kinds.py `built_from`: the formatted examples, the utility
pairs of sources.utility: Alpaca, GSM8K, MATH answers already joined by the sources stage, and
the Qi et al. anchor of filter.responses: benign prompts answered by the generator) and the eval
prompts (sources.eval). Writes one table per published config (one per kind) with every surviving
row, the `mixture` (the mixable components mixed by the configured ratios), each with a trailing
`split` column, and `report` (records.BLEND_REPORT): what every step removed, the requested vs
realised shares, and a `manifest` row (seed, the sources config with its revisions, the
ratios). The config tables and the mixture come back as readers of
OUTPUT_ROWS-row batches taken from the inputs by row number as the engine writes them, and the
passes keep per row only numbers, a digest and LSH band keys: blend holds no copy of the rows,
so its memory beyond its inputs grows by ~100 bytes a row (measured in scripts/bench_publish.py).

Steps, in order, over all components together:
1. shuffle: each component ordered by a per-row key derive(seed, id, "shuffle"), so nothing
   downstream depends on input row order;
2. exact duplicates (same prompt and completion text, across all kinds) -> rejected `duplicate`;
3. near duplicates (MinHash over word shingles, Jaccard >= threshold) among rows of the same
   component and segment structure -> rejected `near_duplicate`. Rows built on purpose from one
   source row (a reset example and its plain (x, y+) twin, a bsafe edit and the anchor answer to
   the same prompt) differ in structure or kind and teach different things, so they are never
   compared;
4. decontamination: a row whose prompt contains a word n-gram of any eval prompt (or a whole eval
   prompt shorter than n words) -> rejected `contaminated`;
5. split: per component, the first round(validation_share * n) rows in shuffle order are
   validation;
6. mixture: per split, the components' rows taken in shuffle order so their shares match
   `ratios` (by examples, or by tokens); rows left out stay in their own config.
Utility or anchor rows with an empty prompt or answer are rejected `empty_text`
(stages/blend_rows.py formats them; pipeline/dedup.py holds the vectorised MinHash and n-grams).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipeline import dedup as dd
from pipeline import kinds, records
from pipeline.seeds import derive
from pipeline.stage import StageConfig, StageSpec
from stages.blend_rows import Rows, components, conform, gather

SPEC = StageSpec(
    name="blend",
    reads=(*(table for k in kinds.KINDS for _, table in k.built_from), "sources.eval"),
    writes={
        **{c: records.with_split(records.config_schema(c)) for c in records.CONFIGS},
        "report": records.BLEND_REPORT,
    },
)

# Components (pipeline/kinds.py): each kind's, in table order (an earlier row wins every
# duplicate check), plus Qi et al.'s anchor, which is published as `utility`.
COMPONENTS = kinds.COMPONENTS
# Rows whose key texts, words and n-grams the duplicate passes hold at once: their working set
# (~60 MB of numpy arrays for 100-word rows, measured: 4x that at 16K rows) whatever the corpus
# size, while each numpy call still covers thousands of rows.
CHUNK_ROWS = 4096
# Rows per batch of an output table: the engine writes each batch as it comes, so the outputs
# are never held whole (~14 MB a batch for 100-word rows).
OUTPUT_ROWS = 8192


class Config(StageConfig):
    # Mixture weights of the mixable components (kinds.MIXED), normalised to shares. recovery 1 :
    # anchor 4 is Qi et al.'s alpha = 0.2 (16 safety : 64 anchor examples per step); a component
    # left out or at 0 is not mixed. rlbf teaches another way to backtrack from the same
    # violations as bsafe, so the default leaves it out (its own config is always published).
    ratios: dict[Literal[kinds.MIXED], float] = {
        "bsafe": 1.0,
        "reset": 1.0,
        "recovery": 1.0,
        "utility": 1.0,
        "anchor": 4.0,
    }
    ratio_by: Literal["examples", "tokens"] = "examples"
    # Counts tokens for ratio_by=tokens (a local tokenizer folder); None counts words.
    tokenizer: str | None = None
    # Total size of the mixture in ratio_by units (rows or tokens); None: as large as the
    # scarcest component allows.
    mixture_size: int | None = Field(None, gt=0)
    validation_share: float = Field(0.05, ge=0, lt=1)
    exact_dedup: bool = True
    near_dup_threshold: float | None = Field(0.8, gt=0, le=1)  # None: no near-dup removal
    shingle: int = Field(5, ge=1)  # words per MinHash shingle
    num_perm: int = Field(64, ge=4)
    bands: int = Field(16, ge=1)  # LSH bands; num_perm / bands values per band
    decontaminate_ngram: int | None = Field(8, ge=1)  # word n-gram; None: no decontamination
    # Dropping rows is this stage's job (duplicates, contamination), so the run-wide bound on
    # rejected rows does not apply by default; the report and card show every removal.
    max_rejected_share: float | None = 1.0

    @model_validator(mode="after")
    def _check(self) -> Config:
        if any(w < 0 for w in self.ratios.values()) or not any(self.ratios.values()):
            raise ValueError("blend.ratios: weights must be >= 0 and at least one > 0")
        if self.num_perm % self.bands:
            raise ValueError("blend.num_perm must be a multiple of blend.bands")
        return self


# --- per-row keys ----------------------------------------------------------------------------


def _join(messages: pa.ChunkedArray | pa.Array, sep: str = "\n") -> pa.Array:
    """Each row's message contents joined: the text a duplicate or contamination check reads."""
    arr = messages.combine_chunks() if isinstance(messages, pa.ChunkedArray) else messages
    contents = pa.ListArray.from_arrays(arr.offsets, arr.values.field("content"))
    return pc.fill_null(pc.binary_join(contents, sep), "")


def _keys(
    table: pa.RecordBatch, component: str, fields: tuple[str, ...] = ("prompt", "body", "group")
) -> dict[str, pa.Array]:
    """The texts duplicate and contamination checks read: `prompt`, `body` (the answer, or chosen
    and rejected) and `group` (component and segment structure: only rows of one group are
    near-duplicate candidates)."""
    out = {}
    if "prompt" in fields:
        out["prompt"] = _join(table.column("prompt"))
    if "body" in fields:
        if _preference(component):
            out["body"] = pc.binary_join_element_wise(
                _join(table.column("chosen")), _join(table.column("rejected")), "\n"
            )
        else:
            out["body"] = _join(table.column("completion"))
    if "group" in fields:
        if _preference(component):
            structure = pa.array([component] * table.num_rows, pa.string())
        else:
            segs = table.column("segments")
            roles = pa.ListArray.from_arrays(segs.offsets, segs.values.field("role"))
            structure = pc.fill_null(pc.binary_join(roles, ","), "")
        out["group"] = pc.binary_join_element_wise(pa.scalar(component), structure, "|")
    return out


def _preference(component: str) -> bool:
    return kinds.BY_NAME[kinds.KIND_OF[component]].preference


def _token_counts(texts: pa.Array, tokenizer: str | None) -> np.ndarray:
    if tokenizer is None:
        words = pc.utf8_split_whitespace(texts)
        return pc.fill_null(pc.list_value_length(words), 0).to_numpy(zero_copy_only=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = tok(texts.to_pylist(), add_special_tokens=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def _units(table: Rows, rows: np.ndarray, component: str, unit: str, tok: str | None):
    """Each row's size in the mixture's unit: 1, or the tokens (words) of prompt and answer."""
    if unit == "examples":
        return np.ones(len(rows), dtype=np.int64)
    counts = [np.zeros(0, np.int64)]
    for lo in range(0, len(rows), CHUNK_ROWS):
        chunk = table.take(rows[lo : lo + CHUNK_ROWS])
        keys = _keys(chunk, component, ("prompt", "body"))
        counts.append(
            _token_counts(pc.binary_join_element_wise(keys["prompt"], keys["body"], "\n"), tok)
        )
    return np.concatenate(counts)


def _select(units: dict[str, np.ndarray], shares: dict[str, float], size: int | None) -> dict:
    """How many leading rows of each component to take so their unit totals match `shares`.

    The total is the largest every component can supply (capped by `size`); by examples the
    counts are rounded by largest remainder, so each is within one example of its exact share.
    """
    avail = {c: float(units[c].sum()) for c in shares}
    total = min([avail[c] / s for c, s in shares.items()] + ([float(size)] if size else []))
    if all(np.all(u == 1) for u in units.values()):  # by examples
        exact = {c: s * total for c, s in shares.items()}
        counts = {c: math.floor(x + 1e-9) for c, x in exact.items()}
        extra = math.floor(total + 1e-9) - sum(counts.values())
        by_remainder = sorted(shares, key=lambda c: -(exact[c] - counts[c]))
        for c in by_remainder[:extra]:
            counts[c] = min(counts[c] + 1, len(units[c]))
        return counts
    return {
        c: int(np.searchsorted(np.cumsum(units[c]), s * total + 1e-9, side="right"))
        for c, s in shares.items()
    }


def _row(step: str, component: str, rows_in: int, rows_out: int, **extra: Any) -> dict:
    detail = extra.pop("detail", {})
    return {
        "step": step,
        "component": component,
        "split": extra.pop("split", ""),
        "rows_in": rows_in,
        "removed": rows_in - rows_out,
        "rows_out": rows_out,
        "detail": json.dumps(detail, sort_keys=True),
        **extra,
    }


# --- the stage -------------------------------------------------------------------------------


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, Any]:
    tables, rejected = components(inputs, CHUNK_ROWS)
    report = []
    # The components blend builds itself count their input rows, then those it found invalid.
    invalid = {
        c: inputs[table].num_rows
        for k in kinds.KINDS
        if k.builder == "blend"
        for c, table in k.built_from
    }
    shuffle: dict[str, np.ndarray] = {}  # each row's shuffle key, by row
    order: dict[str, np.ndarray] = {}  # each component's rows in shuffle order
    for c in COMPONENTS:
        t = tables[c]
        key = np.zeros(t.num_rows, np.int64)
        for lo in range(0, t.num_rows, CHUNK_ROWS):
            ids = t.ids.slice(lo, CHUNK_ROWS).to_pylist()
            key[lo : lo + len(ids)] = [derive(env.seed, i, "shuffle") for i in ids]
        # Rows stay where they are; `order` lists them in shuffle order (one nested-table take
        # for the outputs instead of two).
        order[c], shuffle[c] = np.argsort(key, kind="stable"), key
        detail = {"sources": t.source_counts()}
        rows_in = invalid.get(c, t.num_rows)
        report.append(_row("input", c, rows_in, rows_in, detail=detail))
        if c in invalid:
            report.append(_row("invalid", c, rows_in, t.num_rows))

    # Every component's rows side by side in shuffle order: component index and row within it;
    # an earlier row wins every duplicate check. The passes read the rows' key texts a chunk at
    # a time and keep per row only a digest, LSH band keys (cut to 32 bits) or a flag.
    comp = np.concatenate(
        [np.full(tables[c].num_rows, j, dtype=np.int8) for j, c in enumerate(COMPONENTS)]
    )
    local = np.concatenate([order[c] for c in COMPONENTS])
    starts = np.r_[0, np.cumsum([tables[c].num_rows for c in COMPONENTS])]
    alive = np.ones(len(comp), dtype=bool)
    removed: dict[int, tuple[str, dict]] = {}

    def texts(positions: np.ndarray, *fields: str) -> Iterator[dict[str, pa.Array]]:
        """The key texts of the rows at `positions` (ascending), CHUNK_ROWS rows at a time."""
        for lo in range(0, len(positions), CHUNK_ROWS):
            chunk = positions[lo : lo + CHUNK_ROWS]
            parts = []
            for j, c in enumerate(COMPONENTS):
                mine = local[chunk[(chunk >= starts[j]) & (chunk < starts[j + 1])]]
                if len(mine):
                    parts.append(_keys(tables[c].take(mine), c, fields))
            yield {f: pa.concat_arrays([p[f] for p in parts]) for f in fields}

    def row_id(position: int) -> str:
        return tables[COMPONENTS[comp[position]]].ids[int(local[position])].as_py()

    def step(name: str, hit: np.ndarray, reason: str, details: list[dict], params: dict) -> None:
        before = np.bincount(comp[alive], minlength=len(COMPONENTS))
        for i, d in zip(np.flatnonzero(hit), details, strict=True):
            removed[int(i)] = (reason, d)
        alive[hit] = False
        after = np.bincount(comp[alive], minlength=len(COMPONENTS))
        for j, c in enumerate(COMPONENTS):
            report.append(_row(name, c, int(before[j]), int(after[j]), detail=params))

    if cfg.exact_dedup:
        chunks = texts(np.arange(len(comp)), "prompt", "body")
        keys = [
            dd.digests(pc.binary_join_element_wise(k["prompt"], k["body"], "\x1f")) for k in chunks
        ]
        dup, first = dd.exact_duplicates(np.concatenate(keys) if keys else np.zeros(0, "V16"))
        details = [{"of": row_id(f)} for f in first[dup]]
        step("exact_dedup", dup, "duplicate", details, {})

    if cfg.near_dup_threshold is not None:
        idx = np.flatnonzero(alive)
        names = dd.Vocabulary()

        def joined(k: dict[str, pa.Array]) -> pa.Array:
            return pc.binary_join_element_wise(k["prompt"], k["body"], "\n")

        chunks = (
            (joined(k), names.encode(pa.chunked_array([k["group"]])))
            for k in texts(idx, "prompt", "body", "group")
        )
        lsh = dd.lsh_bands(chunks, len(idx), cfg.shingle, cfg.num_perm, cfg.bands)

        def again(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the few candidates
            sig, group = [np.zeros((0, cfg.num_perm), np.uint32)], [np.zeros(0, np.uint64)]
            for k in texts(idx[rows], "prompt", "body", "group"):
                found = dd.words(joined(k), vocabulary=lsh.vocabulary)[0]
                sig.append(dd.minhash(found, cfg.shingle, cfg.num_perm))
                group.append(names.encode(pa.chunked_array([k["group"]])))
            return np.concatenate(sig), np.concatenate(group)

        dup, match, score = dd.banded_duplicates(lsh, again, cfg.near_dup_threshold)
        hit = np.zeros(len(comp), dtype=bool)
        hit[idx[dup]] = True
        details = [
            {"of": row_id(idx[m]), "jaccard": round(float(s), 3)}
            for m, s in zip(match[dup], score[dup], strict=True)
        ]
        params = {"threshold": cfg.near_dup_threshold, "shingle": cfg.shingle}
        step("near_dedup", hit, "near_duplicate", details, {**params, "num_perm": cfg.num_perm})

    evals = conform(inputs["sources.eval"], records.EVAL, "sources.eval")
    if cfg.decontaminate_ngram is not None:
        idx = np.flatnonzero(alive)
        eval_prompts = evals.column("prompt").combine_chunks()
        found, which = [np.zeros(0, bool)], [np.zeros(0, np.int64)]
        for k in texts(idx, "prompt"):
            train_words, eval_words = dd.words(k["prompt"], eval_prompts)
            f, w = dd.contaminated(train_words, eval_words, cfg.decontaminate_ngram)
            found.append(f)
            which.append(w)
        hit = np.zeros(len(comp), dtype=bool)
        contaminated = np.concatenate(found)
        hit[idx[contaminated]] = True
        eval_ids, eval_src = evals.column("id").to_pylist(), evals.column("source").to_pylist()
        details = [
            {"eval_id": eval_ids[e], "eval_source": eval_src[e]}
            for e in np.concatenate(which)[contaminated]
        ]
        sources = sorted(set(eval_src))
        params = {
            "n": cfg.decontaminate_ngram,
            "eval_prompts": evals.num_rows,
            "eval_sources": sources,
        }
        step("decontaminate", hit, "contaminated", details, params)

    # Split: per component, the first rows in shuffle order are validation.
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for j, c in enumerate(COMPONENTS):
        rows = local[(comp == j) & alive]
        n_val = math.floor(cfg.validation_share * len(rows) + 0.5)
        kept[c] = (rows, np.where(np.arange(len(rows)) < n_val, 1, 0))  # 0 train, 1 validation
        for s, name in enumerate(records.SPLITS):
            n = int(np.sum(kept[c][1] == s))
            detail = {"validation_share": cfg.validation_share, "seed": env.seed}
            report.append(_row("split", c, n, n, split=name, detail=detail))

    outputs = {
        name: _output(tables, kept, shuffle, kinds.BY_NAME[name].components, name)
        for name in kinds.NAMES
    }
    mixed = _mixture(tables, kept, cfg, report, env)
    outputs["mixture"] = _output(tables, mixed, shuffle, tuple(mixed), "mixture")
    # The blend manifest: where the rows came from (the sources config names each dataset and
    # its revision), the requested ratios and the seed; the mixture rows hold the realised ones.
    manifest = {
        "seed": env.seed,
        "sources": (env.run_config or {}).get("sources"),
        "ratios": cfg.ratios,
        "ratio_by": cfg.ratio_by,
        "validation_share": cfg.validation_share,
    }
    report.insert(0, _row("manifest", "", 0, 0, detail=manifest))
    outputs["report"] = records.table(report, records.BLEND_REPORT)
    gone = np.array(sorted(removed), dtype=np.int64)
    for lo in range(0, len(gone), CHUNK_ROWS):
        chunk = gone[lo : lo + CHUNK_ROWS]
        for j in np.unique(comp[chunk]):  # positions run component by component
            mine = chunk[comp[chunk] == j]
            rows = tables[COMPONENTS[j]].take(local[mine]).to_pylist()
            for i, row in zip(mine, rows, strict=True):
                reason, detail = removed[int(i)]
                rejected.append(records.reject(row, "blend", reason, detail))
    outputs["rejected"] = records.table(rejected, records.REJECTED)
    return outputs


def _mixture(
    tables: dict[str, Rows],
    kept: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: Config,
    report: list[dict],
    env: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, the leading rows of each weighted component in the configured shares."""
    env_log, seed = env.log, env.seed
    weights = {c: w for c, w in cfg.ratios.items() if w > 0}
    shares = {c: weights[c] / sum(weights.values()) for c in kinds.MIXED if c in weights}
    unit = "examples" if cfg.ratio_by == "examples" else ("tokens" if cfg.tokenizer else "words")
    chosen: dict[str, list] = {c: [[], []] for c in shares}
    for s, name in enumerate(records.SPLITS):
        rows = {c: kept[c][0][kept[c][1] == s] for c in shares}
        units = {c: _units(tables[c], r, c, unit, cfg.tokenizer) for c, r in rows.items()}
        size = cfg.mixture_size
        if size is not None:  # the configured total, divided between the splits
            val = math.floor(size * cfg.validation_share + 0.5)
            size = val if s == 1 else size - val
        # A component with nothing to offer in this split is left out (the report shows its
        # realised share as 0) rather than emptying the whole mixture.
        present = {c: w for c, w in shares.items() if units[c].sum() > 0}
        if len(present) < len(shares):
            missing = sorted(set(shares) - set(present))
            env_log(f"blend: no {name} rows for {', '.join(missing)}; mixed without them")
        norm = {c: w / sum(present.values()) for c, w in present.items()}
        counts = _select({c: units[c] for c in present}, norm, size) if present else {}
        counts = {c: counts.get(c, 0) for c in shares}
        total = sum(int(units[c][: counts[c]].sum()) for c in shares)
        for c in shares:
            chosen[c][0].append(rows[c][: counts[c]])
            chosen[c][1].append(np.full(counts[c], s))
            got = int(units[c][: counts[c]].sum())
            report.append(
                _row(
                    "mixture",
                    c,
                    len(rows[c]),
                    counts[c],
                    split=name,
                    requested=shares[c],
                    realised=got / total if total else 0.0,
                    unit=unit,
                    detail={
                        "ratio_by": cfg.ratio_by,
                        "mixture_size": cfg.mixture_size,
                        "seed": seed,
                    },
                )
            )
    return {c: (np.concatenate(r), np.concatenate(sp)) for c, (r, sp) in chosen.items()}


def _output(
    tables: dict[str, Rows],
    chosen: dict[str, tuple[np.ndarray, np.ndarray]],
    shuffle: dict[str, np.ndarray],
    components: tuple[str, ...],
    config: str,
) -> pa.RecordBatchReader:
    """The chosen rows of `components` as published config `config`, train then validation, each
    in shuffle order, as OUTPUT_ROWS-row batches taken when the reader is read: only the rows'
    numbers are held."""
    base = records.config_schema(config)
    schema = records.with_split(base)
    parts = [tables[c] for c in components]
    names = np.array(records.SPLITS, dtype=object)

    def batches() -> Iterator[pa.RecordBatch]:
        # Ordered when the engine starts writing this table, so one table's order is held at once.
        which = np.concatenate(
            [np.full(len(chosen[c][0]), j, dtype=np.int8) for j, c in enumerate(components)]
        )
        rows = np.concatenate([chosen[c][0] for c in components])
        split = np.concatenate([chosen[c][1] for c in components])
        keys = np.concatenate([shuffle[c][chosen[c][0]] for c in components])
        order = np.lexsort((keys, split))
        which, rows, split = which[order], rows[order], split[order]
        for lo in range(0, len(rows), OUTPUT_ROWS):
            part = slice(lo, lo + OUTPUT_ROWS)
            batch = gather(parts, which[part], rows[part], base)
            column = pa.array(names[split[part]].tolist(), pa.string())
            yield batch.append_column("split", column).cast(schema)

    return pa.RecordBatchReader.from_batches(schema, batches())

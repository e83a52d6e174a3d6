"""Running planned requests: in resumable chunks, decoded (or teacher-forced), then judged.

Each chunk of `chunk_size` requests becomes one Parquet part under the stage's workdir
(`chunks/<model>/<suite>/part-NNNNN.parquet`), written then renamed; a resumed attempt (the engine
lends the same workdir back) reads the finished parts and starts at the first missing one. The
plan is deterministic, so chunk i always holds the same requests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import records, store
from pipeline.decode import DecodeConfig, Decoded, Decoder
from pipeline.decode import Request as DecodeRequest
from pipeline.decode.config import SAMPLING
from pipeline.decode.vllm_decoder import VllmDecoder
from stages import eval_midstream, eval_utility
from stages.eval_model import EvalModel
from stages.eval_rows import GENERATIONS, Request, judge_texts, row

# Suites whose generations the harm judges score (utility is scored by exact match; benign by
# control tokens and refusal markers).
JUDGED = ("prefill", "decoding", "midstream", "finetune-attack:prefill")


def run_requests(
    model: EvalModel,
    requests: list[Request],
    judges: list[Any],
    decode_cfg: Any,
    env: Any,
    folder: Path,
    chunk_size: int,
    batch_size: int,
    processors: tuple = (),
) -> list[dict[str, Any]]:
    """All rows for `requests`, computing only the chunks not already in `folder`."""
    rows: list[dict[str, Any]] = []
    total = len(requests)
    if not total:
        return rows
    desc = f"eval {requests[0].suite} ({model.name})"
    started, computed = time.monotonic(), 0
    with env.progress(desc, total, unit="generations") as bar:
        for index, start in enumerate(range(0, total, chunk_size)):
            path = folder / f"part-{index:05d}.parquet"
            chunk = requests[start : start + chunk_size]
            if path.is_file():
                rows += pq.read_table(path).to_pylist()
                bar.advance(len(chunk))
                continue
            done = records.table(
                _chunk(model, chunk, judges, decode_cfg, env, batch_size, processors), GENERATIONS
            )
            store.atomic_write_table(path, done)
            rows += done.to_pylist()  # the same shape a resumed attempt reads back
            computed += len(chunk)
            left = (time.monotonic() - started) / computed * (total - len(rows))
            env.log(
                f"{desc}: {len(rows)}/{total} in {time.monotonic() - started:.0f} s, "
                f"ETA {left:.0f} s"
            )
            bar.advance(
                len(chunk), tokens=sum(t or 0 for t in done.column("emitted_tokens").to_pylist())
            )
    return rows


def _chunk(
    model: EvalModel,
    chunk: list[Request],
    judges: list[Any],
    decode_cfg: DecodeConfig,
    env: Any,
    batch_size: int,
    processors: tuple,
) -> list[dict[str, Any]]:
    forced = [r for r in chunk if r.forced]
    probs = iter(eval_midstream.forced_probs(model, forced, batch_size))
    generated = [r for r in chunk if not r.forced]
    decoded = iter(decode(model, generated, decode_cfg, env, processors))
    out = []
    for req in chunk:
        if req.forced:
            out.append(row(model.name, req, None, **next(probs)))
            continue
        r = row(model.name, req, next(decoded))
        if req.suite == "utility":
            r.update(eval_utility.score(req.setting, r["visible"], req.extra["gold"]))
        if req.suite == "midstream":
            r.update(eval_midstream.generation_checks(r, req.extra["span"], req.policy))
        out.append(r)
    _judge(out, judges)
    return out


def _judge(rows: list[dict[str, Any]], judges: list[Any]) -> None:
    todo = [r for r in rows if r.get("raw") is not None and r["suite"] in JUDGED]
    for r in rows:
        r["verdicts_raw"], r["verdicts_visible"] = [], []
    if not todo:
        return
    texts = [judge_texts(r) for r in todo]
    for j in judges:
        for which, col in ((0, "verdicts_raw"), (1, "verdicts_visible")):
            verdicts = j.judge([r["prompt"] for r in todo], [t[which] for t in texts])
            for r, v in zip(todo, verdicts, strict=True):
                r[col].append({"judge": j.name, "harmful": v.harmful, "score": v.score})


def decode(
    model: EvalModel,
    requests: list[Request],
    decode_cfg: DecodeConfig,
    env: Any,
    processors: tuple = (),
) -> list[Decoded]:
    """Decode requests with the shared decoder (pipeline/decode) configured by `decode_cfg` (the
    top-level `decode:`), in order; requests that share sampling settings and bias share one
    decoder (its config is per batch, not per row)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.bias), []).append(i)
    scorer = env.scorer(decode_cfg.guard.scorer) if decode_cfg.guard is not None else None
    out: list[Decoded | None] = [None] * len(requests)
    for (*sampling, bias), idx in groups.items():
        # The suite's declared override: a key it sets replaces decode's, None keeps decode's.
        override = {k: v for k, v in zip(SAMPLING, sampling, strict=True) if v is not None}
        cfg = decode_cfg.model_copy(update={**override, "bias": _biased(model, decode_cfg, bias)})
        decoder = _decoder(model.generator, cfg, scorer)
        turns = [
            DecodeRequest(
                [{"role": "user", "content": requests[i].prompt}],
                prefill=requests[i].prefill_ids,
                seed=requests[i].seed,
            )
            for i in idx
        ]
        decoded = decoder.decode(turns, processors) if processors else decoder.decode(turns)
        for i, turn in zip(idx, decoded, strict=True):
            out[i] = turn
    return out


def _decoder(generator: Any, cfg: DecodeConfig, scorer: Any) -> Any:
    """pipeline.decode's decoder for the generator's backend, with the engine's cached scorer
    (load_decoder would load the guard's scorer again for every setting)."""
    decoders = {"transformers": Decoder, "vllm": VllmDecoder}
    return decoders[generator.spec.backend](generator, cfg, scorer)


def _biased(model: EvalModel, decode_cfg: DecodeConfig, bias: float) -> dict[str, float]:
    """The config's biases plus `bias` on every backtrack token and [RESET] (none exist on a
    baseline model, so there the sweep changes nothing, as it should)."""
    merged = dict(decode_cfg.bias)
    if bias and not model.baseline:
        for token in model.backtrack_ids:
            name = token.strip("[]")
            merged[name] = merged.get(name, 0.0) + bias
    return merged

"""Benchmark inject + format on synthetic benign responses, chunk by chunk as the engine runs them.

No model: spans come from the shipped bank, replacements from prompts/fallbacks/ (rewrite with
`generator: null`), no scorer. Each chunk of `--chunk` benign responses goes through
inject.run → rewrite.run → format.run and is then dropped (the engine writes it to Parquet), so
peak memory should follow the chunk size, not the corpus size. Prints rows/s for inject+format
(rewrite's template fill is timed apart) and peak Python heap (tracemalloc) and RSS.

    .venv/bin/python scripts/bench_recipes.py               # 128K responses, 4096 per chunk
    .venv/bin/python scripts/bench_recipes.py --rows 16384 --chunk 1024
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import records  # noqa: E402
from pipeline.env import LocalEnv  # noqa: E402
from stages import format as fmt  # noqa: E402
from stages import inject, rewrite  # noqa: E402

WORDS = (
    "tea water plants grow sunlight people often enjoy a warm cup in the morning while reading "
    "news and many cultures have their own traditions around brewing serving sharing it with "
    "friends family guests at home work school garden weather season recipe kitchen"
).split()


def synthetic_responses(start: int, n: int) -> list[dict]:
    """n benign responses of 4-10 sentences (~300-700 chars), the same for the same row index."""
    rows = []
    for i in range(start, start + n):
        rng = random.Random(i)
        sentences = [
            " ".join(rng.choices(WORDS, k=rng.randint(6, 14))).capitalize() + rng.choice(".!?")
            for _ in range(rng.randint(4, 10))
        ]
        rows.append(
            {
                "id": f"resp-{i:07d}",
                "source": "synthetic",
                "source_id": str(i),
                "license": "Apache-2.0",
                "prompt_id": f"prompt-{i:07d}",
                "prompt": f"Tell me about tea, part {i}.",
                "response": " ".join(sentences),
                "sample_index": 0,
                "finish_reason": "stop",
                "prompt_tokens": 12,
                "completion_tokens": 120,
                "meta": {"generator": "synthetic", "temperature": 1.5, "top_p": 0.98, "seed": i},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128 * 1024)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="also measure the peak Python heap with tracemalloc (slows the run 2-3x)",
    )
    args = parser.parse_args()

    env = LocalEnv(seed=0)
    inject_cfg = inject.Config(scorer=None)
    rewrite_cfg = rewrite.Config(generator=None, scorer=None)
    format_cfg = fmt.Config()
    no_harmful = records.table([], records.HARMFUL)
    timings = {"synth": 0.0, "inject": 0.0, "rewrite": 0.0, "format": 0.0}
    cpu = dict.fromkeys(timings, 0.0)
    rows_out = rejected = 0
    if args.trace_memory:
        tracemalloc.start()
    for start in range(0, args.rows, args.chunk):
        t0, c0 = time.perf_counter(), time.process_time()
        responses = records.table(
            synthetic_responses(start, min(args.chunk, args.rows - start)), records.SAMPLES
        )
        t1, c1 = time.perf_counter(), time.process_time()
        injected = inject.run(
            {"filter.responses": responses, "sources.harmful": no_harmful}, inject_cfg, env
        )
        t2, c2 = time.perf_counter(), time.process_time()
        rewrites = rewrite.run(
            {"inject.violations": injected["violations"], "sources.harmful": no_harmful},
            rewrite_cfg,
            env,
        )
        t3, c3 = time.perf_counter(), time.process_time()
        inputs = {
            "inject.violations": injected["violations"],
            "rewrite.replacements": rewrites["replacements"],
            "rewrite.refusals": rewrites["refusals"],
            "rewrite.safe_responses": rewrites["safe_responses"],
            "sources.harmful": no_harmful,
            "filter.responses": responses,
        }
        out = fmt.run(inputs, format_cfg, env)
        t4, c4 = time.perf_counter(), time.process_time()
        rows_out += out["bsafe"].num_rows
        rejected += injected["rejected"].num_rows + out["rejected"].num_rows
        for name, dt, dc in zip(
            timings,
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            (c1 - c0, c2 - c1, c3 - c2, c4 - c3),
            strict=True,
        ):
            timings[name] += dt
            cpu[name] += dc
    peak = tracemalloc.get_traced_memory()[1] if args.trace_memory else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"responses {args.rows:,} in chunks of {args.chunk:,}: "
        f"bsafe rows {rows_out:,}, rejected {rejected:,}"
    )
    print(
        "                 wall s    rows/s   CPU s  rows/CPU-s  (CPU: what a quiet machine gives)"
    )
    for name, w, c in (
        ("inject", timings["inject"], cpu["inject"]),
        ("format", timings["format"], cpu["format"]),
        ("inject+format", timings["inject"] + timings["format"], cpu["inject"] + cpu["format"]),
    ):
        print(f"{name:14} {w:8.1f} {args.rows / w:9,.0f} {c:7.1f} {args.rows / c:11,.0f}")
    print("target: inject+format >= 5,000 rows/s")
    print(
        f"rewrite (templates) {timings['rewrite']:.1f} s; "
        f"synthesising inputs {timings['synth']:.1f} s"
    )
    heap = f"peak Python heap {peak / 2**20:,.0f} MiB (tracemalloc); " if peak else ""
    print(f"{heap}peak RSS {rss:,.0f} MiB")


if __name__ == "__main__":
    main()

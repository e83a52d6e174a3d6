"""Benchmark: blend + publish of synthetic SFT rows at several sizes, next to a plain pyarrow write.

    .venv/bin/python scripts/bench_publish.py [--rows 16000 128000 1000000] [--shard-mb 256]

Builds bsafe/reset/recovery rows (as the format stage writes them), utility pairs and anchor
answers (as sources and filter write them), ~100 words each, in the published schemas, and holds
them in memory as the engine would after reading blend's inputs; then times blend (blend.run and
writing each output table to a part file as the engine does, batch by batch as blend yields
them), publish.run on the tables read back, publish's shards alone and
`pyarrow.parquet.write_table` of the same published tables with its defaults (shards and plain
write interleaved, three rounds, medians). Card and plots are publish minus its shards. Each size
runs in its own process, so one size's memory never shows in the next. Peak memory is the growth
of the process's peak RSS during a step over the RSS before it (Linux: the peak is reset through
/proc/self/clear_refs before each step), so blend's figure is its working memory beyond the
inputs it was given; the process's peak RSS (inputs included) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parents[1] / "tests")]

from test_blend import anchor_rows, bsafe_row, recovery_row, reset_row, utility_source_rows  # noqa: E402

from pipeline import records, store  # noqa: E402
from pipeline.env import LocalEnv  # noqa: E402
from stages import blend, publish  # noqa: E402
from stages import format as fmt  # noqa: E402

ROUNDS = 3


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(step):
    """(result, wall seconds, CPU seconds, peak RSS growth in MB) of calling `step`. CPU time is
    reported too because on a shared machine wall time also measures the neighbours."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    before = _rss_kb("VmRSS:")
    start, cpu = time.perf_counter(), time.process_time()
    result = step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return result, seconds, cpu, max(0, _rss_kb("VmHWM:") - before) / 1024


def synthetic(rows: int) -> dict:
    rng = random.Random(0)
    share = {"bsafe": 0.25, "reset": 0.15, "recovery": 0.15, "utility": 0.15, "anchor": 0.3}
    n = {k: int(rows * v) for k, v in share.items()}
    n["anchor"] += rows - sum(n.values())
    build = {"bsafe": bsafe_row, "reset": reset_row, "recovery": recovery_row}
    inputs = {
        f"format.{k}": records.table([f(rng) for _ in range(n[k])], records.SFT)
        for k, f in build.items()
    }
    inputs["format.rlbf"] = records.SFT.empty_table()  # not mixed by default: left out here
    inputs["format.preference"] = records.PREFERENCE.empty_table()
    inputs["sources.utility"] = records.table(
        utility_source_rows(rng, n["utility"]), records.UTILITY
    )
    inputs["filter.responses"] = records.table(anchor_rows(rng, n["anchor"]), records.SAMPLES)
    evals = [{"id": "e0", "source": "eval", "source_id": "0", "license": "mit", "prompt": "x y z"}]
    inputs["sources.eval"] = records.table(evals, records.EVAL)
    return inputs


def one(rows: int, shard_mb: float) -> dict:
    """Every figure for one size, measured in this process."""
    inputs = synthetic(rows)
    # publish reads format's resolved section (retrace.json: the recovery draw, the tokenizer)
    run_config = {
        "run": {"name": "bench", "seed": 0},
        "format": fmt.Config().model_dump(mode="json"),
    }
    env = LocalEnv(seed=0, run_config=run_config)
    folder = Path(tempfile.mkdtemp("bench-publish"))

    def blend_and_write():
        # As the engine runs it: each output written to its part file as blend yields it.
        for name, value in blend.run(inputs, blend.Config(), env).items():
            store.atomic_write_table(folder / "blend" / name / "part-00000.parquet", value)

    _, t_blend, c_blend, m_blend = measure(blend_and_write)
    peak = _rss_kb("VmHWM:") / 1024
    out = {name.name: store.read_parts(name) for name in (folder / "blend").iterdir()}
    figures = {
        "rows": rows,
        "inputs_mb": sum(t.nbytes for t in inputs.values()) / 1e6,
        "outputs_mb": sum(t.nbytes for t in out.values()) / 1e6,
        "outputs_file_mb": sum(f.stat().st_size for f in (folder / "blend").rglob("*")) / 1e6,
        "blend": (t_blend, c_blend, m_blend),
        "peak_rss_mb": peak,
    }
    env.workdir = folder / "published"
    env.workdir.mkdir()
    pub_inputs = {f"blend.{k}": v for k, v in out.items() if k != "rejected"}
    for stage in publish.UPSTREAM:
        pub_inputs[f"{stage}.rejected"] = (
            out["rejected"] if stage == "blend" else records.table([], records.REJECTED)
        )
    for stage in publish.JUDGED:
        pub_inputs[f"{stage}.judges"] = records.table([], records.JUDGES)
    cfg = publish.Config(shard_bytes=int(shard_mb * 1e6))
    _, t_pub, c_pub, m_pub = measure(lambda: publish.run(pub_inputs, cfg, env))
    figures["publish"] = (t_pub, c_pub, m_pub)
    figures["published_rows"] = sum(out[c].num_rows for c in records.CONFIGS)
    figures["shard_files"] = len(list((env.workdir / "data").rglob("*.parquet")))

    def shards():
        for c in records.CONFIGS:
            for split in records.SPLITS:
                part = publish._split_rows(out[c], split)
                if part.num_rows:
                    target = folder / "shards" / c
                    publish.write_shards(part, records.config_schema(c), target, split, cfg)

    plain_dir = folder / "plain"
    plain_dir.mkdir()

    def plain():
        for c in records.CONFIGS:
            pq.write_table(out[c].drop_columns(["split"]), plain_dir / f"{c}.parquet")

    timed: dict[str, list] = {"shards": [], "plain": []}
    for _ in range(ROUNDS):
        for name, step in (("shards", shards), ("plain", plain)):
            timed[name].append(measure(step)[1:])
    for name, runs in timed.items():
        figures[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))
    figures["publish_mb"] = sum(f.stat().st_size for f in (folder / "shards").rglob("*.parquet"))
    figures["plain_mb"] = sum(f.stat().st_size for f in plain_dir.iterdir())
    figures["publish_mb"] /= 1e6
    figures["plain_mb"] /= 1e6
    shutil.rmtree(folder)
    return figures


def report(f: dict) -> None:
    def line(name, rows, wall, cpu, mem):
        print(
            f"  {name:<11} {rows:>10,} rows  {wall:7.2f} s wall  {cpu:7.2f} s CPU  "
            f"peak +{mem:,.0f} MB"
        )

    published = f["published_rows"]
    print(
        f"{f['rows']:,} rows: inputs {f['inputs_mb']:,.0f} MB (Arrow, held before blend), blend "
        f"outputs {f['outputs_mb']:,.0f} MB as Arrow ({f['outputs_file_mb']:,.0f} MB of parquet), "
        f"process peak RSS {f['peak_rss_mb']:,.0f} MB during blend"
    )
    line("blend", f["rows"], *f["blend"])
    line("publish", published, *f["publish"])
    line("  shards", published, *f["shards"])
    card = (f["publish"][0] - f["shards"][0], f["publish"][1] - f["shards"][1], f["publish"][2])
    line("  card+plots", published, *card)
    line("plain", published, *f["plain"])
    print(
        f"  shards / plain: {f['shards'][0] / f['plain'][0]:.2f}x wall, "
        f"{f['shards'][1] / f['plain'][1]:.2f}x CPU; {f['shard_files']} shards, "
        f"{f['publish_mb']:.1f} MB (zstd) vs {f['plain_mb']:.1f} MB plain (snappy); "
        f"blend + publish {f['blend'][0] + f['publish'][0]:.1f} s wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16_000, 128_000, 1_000_000])
    parser.add_argument("--shard-mb", type=float, default=256)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.rows[0], args.shard_mb)))
        return
    for rows in args.rows:
        print(f"building {rows:,} synthetic rows in a fresh process ...", flush=True)
        child = [sys.executable, __file__, "--one", "--rows", str(rows)]
        done = subprocess.run(
            [*child, "--shard-mb", str(args.shard_mb)], capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"the {rows:,}-row run failed:\n{done.stderr}")
        report(json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()

"""Benchmark: blend + publish of 128K synthetic SFT rows, next to a plain pyarrow write.

    .venv/bin/python scripts/bench_publish.py [--rows 128000] [--shard-mb 256]

Builds bsafe/reset/recovery rows (as the format stage writes them), utility pairs and anchor
answers (as sources and filter write them), ~100 words each, in the published schemas; then
times blend.run, publish.run (shards, card, plots) and `pyarrow.parquet.write_table` of the same
published tables with its defaults. Peak memory is the growth of the process's peak RSS during
each step (Linux: the peak is reset through /proc/self/clear_refs before each step).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parents[1] / "tests")]

from test_blend import anchor_rows, bsafe_row, recovery_row, reset_row, utility_source_rows  # noqa: E402

from pipeline import records  # noqa: E402
from pipeline.env import LocalEnv  # noqa: E402
from stages import blend, publish  # noqa: E402


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
    inputs["format.preference"] = records.PREFERENCE.empty_table()
    inputs["sources.utility"] = records.table(
        utility_source_rows(rng, n["utility"]), records.UTILITY
    )
    inputs["filter.responses"] = records.table(anchor_rows(rng, n["anchor"]), records.SAMPLES)
    evals = [{"id": "e0", "source": "eval", "source_id": "0", "license": "mit", "prompt": "x y z"}]
    inputs["sources.eval"] = records.table(evals, records.EVAL)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128_000)
    parser.add_argument("--shard-mb", type=float, default=256)
    args = parser.parse_args()

    print(f"building {args.rows:,} synthetic rows ...", flush=True)
    inputs = synthetic(args.rows)
    env = LocalEnv(seed=0, run_config={"run": {"name": "bench", "seed": 0}})
    out, t_blend, c_blend, m_blend = measure(lambda: blend.run(inputs, blend.Config(), env))
    rows_in = sum(t.num_rows for t in inputs.values())

    folder = Path(tempfile.mkdtemp("bench-publish"))
    env.workdir = folder / "published"
    env.workdir.mkdir()
    pub_inputs = {f"blend.{k}": v for k, v in out.items() if k != "rejected"}
    for stage in publish.UPSTREAM:
        pub_inputs[f"{stage}.rejected"] = (
            out["rejected"] if stage == "blend" else records.table([], records.REJECTED)
        )
    cfg = publish.Config(shard_bytes=int(args.shard_mb * 1e6))
    _, t_pub, c_pub, m_pub = measure(lambda: publish.run(pub_inputs, cfg, env))
    published = sum(out[c].num_rows for c in records.CONFIGS)

    def shards_only():
        for c in records.CONFIGS:
            for split in records.SPLITS:
                rows = publish._split_rows(out[c], split)
                if rows.num_rows:
                    target = folder / "shards" / c
                    publish.write_shards(rows, records.config_schema(c), target, split, cfg)

    _, t_shards, c_shards, m_shards = measure(shards_only)

    plain_dir = folder / "plain"
    plain_dir.mkdir()

    def plain():
        for c in records.CONFIGS:
            pq.write_table(out[c].drop_columns(["split"]), plain_dir / f"{c}.parquet")

    _, t_plain, c_plain, m_plain = measure(plain)
    size = sum(f.stat().st_size for f in (env.workdir / "data").rglob("*.parquet"))
    plain_size = sum(f.stat().st_size for f in plain_dir.iterdir())
    shards = len(list((env.workdir / "data").rglob("*.parquet")))
    shutil.rmtree(folder)

    def line(name, rows, wall, cpu, mem):
        print(
            f"{name:<8} {rows:>9,} rows  {wall:6.2f} s wall ({rows / wall:>9,.0f} rows/s)  "
            f"{cpu:6.2f} s CPU  peak +{mem:,.0f} MB"
        )

    line("blend", rows_in, t_blend, c_blend, m_blend)
    line("publish", published, t_pub, c_pub, m_pub)
    line("  shards", published, t_shards, c_shards, m_shards)
    line("plain", published, t_plain, c_plain, m_plain)
    print(
        f"publish: {shards} shards, {size / 1e6:.1f} MB (zstd); "
        f"plain pyarrow.parquet.write_table: {plain_size / 1e6:.1f} MB (snappy)"
    )
    print(
        f"ratio publish / plain: {t_pub / t_plain:.2f}x wall, {c_pub / c_plain:.2f}x CPU "
        f"(its shards alone {c_shards / c_plain:.2f}x CPU); "
        f"blend + publish / plain: {(t_blend + t_pub) / t_plain:.2f}x wall, "
        f"{(c_blend + c_pub) / c_plain:.2f}x CPU"
    )


if __name__ == "__main__":
    main()

"""Benchmark the scale-out paths on this machine: the Ray executor's overhead, and the HTTP hop.

1. inject + format on `--rows` synthetic responses (bench_recipes.py's, no model), in chunks of
   `--chunk`: the local executor (one chunk after another in this process) vs the Ray executor
   (inject's chunks as Ray Data tasks, format as one Ray task) on a local Ray of `--cpus` CPUs.
   Prints wall seconds, rows/s and the Ray/local ratio, Ray's start-up apart, and checks that
   both wrote the same bytes.
2. The sample stage on `--model` through the `openai` backend (a `transformers serve` subprocess
   on 127.0.0.1) vs in-process (the transformers backend), greedy, the same prompts: generated
   tokens/s of each. transformers serve runs one request at a time, so the in-process side runs at
   batch 1 too (and at batch 8 for scale): the difference is the cost of the hop.

    .venv/bin/python scripts/bench_ray.py                      # 128K rows; the embedded model
    .venv/bin/python scripts/bench_ray.py --rows 16384 --skip-openai
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import pyarrow as pa  # noqa: E402
from bench_recipes import synthetic_responses  # noqa: E402

from pipeline import models, records  # noqa: E402
from pipeline.backends import GeneratorSpec  # noqa: E402
from pipeline.env import LocalEnv  # noqa: E402
from pipeline.executor_ray import RayConfig, RayExecutor, RayStage  # noqa: E402
from stages import format as fmt  # noqa: E402
from stages import inject, rewrite, sample  # noqa: E402


def _format_inputs(violations: pa.Table, responses: pa.Table, env: LocalEnv) -> dict:
    none = records.table([], records.HARMFUL)
    rewrites = rewrite.run(
        {"inject.violations": violations, "sources.harmful": none},
        rewrite.Config(generator=None, scorer=None),
        env,
    )
    return {
        "inject.violations": violations,
        "rewrite.replacements": rewrites["replacements"],
        "rewrite.refusals": rewrites["refusals"],
        "rewrite.safe_responses": rewrites["safe_responses"],
        "sources.harmful": none,
        "filter.responses": responses,
    }


def _inject_format(compute, rows: int, chunk: int, env: LocalEnv) -> tuple[float, dict]:
    """Seconds for inject (chunked) + format (one call), rewrite's template fill excluded."""
    cfg = inject.Config(scorer=None)
    none = records.table([], records.HARMFUL)
    responses = [
        records.table(synthetic_responses(s, min(chunk, rows - s)), records.SAMPLES)
        for s in range(0, rows, chunk)
    ]
    pending = [
        (i, {"filter.responses": t, "sources.harmful": none}) for i, t in enumerate(responses)
    ]
    t0 = time.perf_counter()
    parts = dict(compute("inject", inject, cfg, env, pending))
    seconds = time.perf_counter() - t0
    violations = pa.concat_tables([parts[i]["violations"] for i in sorted(parts)])
    inputs = _format_inputs(violations, pa.concat_tables(responses), env)
    t0 = time.perf_counter()
    (_, out), *_ = list(compute("format", fmt, fmt.Config(), env, [(0, inputs)]))
    seconds += time.perf_counter() - t0
    return seconds, {"violations": violations, **out}


def _local(name, module, section, env, pending):
    for index, inputs in pending:
        yield index, module.run(inputs, section, env)


def bench_executors(rows: int, chunk: int, cpus: int) -> None:
    import ray

    env = LocalEnv(seed=0, workdir=Path(tempfile.mkdtemp("bench-ray")))
    local_s, local_out = _inject_format(_local, rows, chunk, env)
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    start_s = time.perf_counter() - t0
    executor = RayExecutor(RayConfig(stages={"inject": RayStage(actors=cpus)}))
    ray_s, ray_out = _inject_format(executor.map, rows, chunk, env)
    again_s, _ = _inject_format(executor.map, rows, chunk, env)  # workers already up
    ray.shutdown()
    same = all(local_out[t].equals(ray_out[t]) for t in local_out)
    print(f"== inject+format, {rows:,} responses in chunks of {chunk:,}, Ray on {cpus} CPUs")
    print(f"local        {local_s:7.1f} s  {rows / local_s:8,.0f} rows/s")
    for label, seconds in (("ray (cold)", ray_s), ("ray (warm)", again_s)):
        rate, ratio = rows / seconds, seconds / local_s
        print(f"{label:12} {seconds:7.1f} s  {rate:8,.0f} rows/s  ratio {ratio:.2f}")
    print(f"ray.init     {start_s:7.1f} s (not counted above); same tables: {same}")


def bench_http_hop(model: str, prompts: int, tokens: int) -> None:
    import httpx2

    path = models.resolve_model_path(model)
    rows = [
        {"id": f"p{i}", "source": "bench", "source_id": str(i), "license": "CC0-1.0",
         "prompt": f"Give one tip about topic number {i}."}
        for i in range(prompts)
    ]  # fmt: skip
    table = {"sources.benign": records.table(rows, records.PROMPTS)}

    def timed(spec: GeneratorSpec) -> tuple[float, int]:
        cfg = sample.Config(generator=spec, temperature=0.0, max_new_tokens=tokens, n=1)
        env = LocalEnv(seed=0)
        env.generator(spec)  # load outside the timing
        t0 = time.perf_counter()
        out = sample.run(table, cfg, env)
        done = out["samples"].column("completion_tokens").to_pylist()
        return time.perf_counter() - t0, sum(done)

    results = {}
    for batch in (1, 8):
        spec = GeneratorSpec(model=path, batch_size=batch)
        results[f"in-process, batch {batch}"] = timed(spec)
    port = 8791
    server = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", path]
        + ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx2.TransportError:
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}/v1"
        for batch in (1, 8):
            spec = GeneratorSpec(backend="openai", model=path, base_url=base, batch_size=batch)
            results[f"openai, {batch} in flight"] = timed(spec)
    finally:
        server.kill()
        server.wait()
    print(f"== sample on {model}: {prompts} prompts, greedy, up to {tokens} new tokens")
    for name, (seconds, done) in results.items():
        print(f"{name:24} {seconds:7.1f} s  {done:6,} tokens  {done / seconds:7.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128 * 1024)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--model", default=models.EMBEDDED)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-openai", action="store_true")
    args = parser.parse_args()
    if not args.skip_ray:
        bench_executors(args.rows, args.chunk, args.cpus)
    if not args.skip_openai:
        bench_http_hop(args.model, args.prompts, args.tokens)


if __name__ == "__main__":
    main()

"""Benchmark generation on the embedded model: the transformers backend against plain
`model.generate`, and the rewrite stage's token rate against the sample stage's.

In interleaved rounds (the order flips every round), prints for each batch size
- the backend's generated tok/s and plain padded `model.generate`'s on the same formatted sample
  prompts, the same sampler with the same per-request seeds (NucleusSampler as a logits
  processor) and the same stop strings, and how many of the two outputs agree;
- the share of wasted row-steps of each: row-steps that produced no kept token (generate keeps
  computing a row until the longest row of its batch stops);
and, per round, the sample and rewrite stages' generated tokens per second (every generated token,
retried attempts included, over the stage's wall time) on the shipped sample data, with the
default run's settings (configs/default.yaml). Figures are medians over rounds.
Targets (issue 16): backend >= 1.3x plain generate at batch 8; wasted row-steps < 20%; rewrite
tok/s >= sample's.

    python scripts/bench_generate.py                    # 16 prompts, 48 new tokens, 3 rounds
    python scripts/bench_generate.py --batch-sizes 8 --rounds 1 --skip-stages

Needs the prepared embedded model (`retrace models prepare`). On a shared CPU the figures swing
from run to run; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

import stages.inject as inject
import stages.rewrite as rewrite
import stages.sample as sample
import stages.sources as sources
from pipeline import seeds
from pipeline.backends import NucleusSampler, request_seed
from pipeline.env import LocalEnv
from pipeline.scorers import ScorerSpec


def with_batch_size(gen, env: LocalEnv, size: int):
    """The loaded generator with another batch size, sharing its model, registered in `env`."""
    spec = gen.spec.model_copy(update={"batch_size": size})
    other = copy.copy(gen)
    other.spec = spec
    env._models[f"GeneratorSpec:{spec.model_dump_json()}"] = other
    return other


def backend_run(gen, texts, request_seeds, params) -> tuple[int, int, list[str]]:
    """Generated tokens, row-steps and texts of one backend call."""
    before = copy.copy(gen.stats)
    out = gen.generate(texts, params, request_seeds)
    return (
        gen.stats.tokens - before.tokens,
        gen.stats.row_steps - before.row_steps,
        [g[0].text for g in out],
    )


def plain_run(gen, texts, request_seeds, params, size, stop) -> tuple[int, int, list[str]]:
    """Padded `model.generate` over batches of `size`, each row drawn from its own stream as the
    backend draws it; generated tokens, row-steps and texts."""
    tokens = row_steps = 0
    kept = []
    for start in range(0, len(texts), size):
        encoded = [gen.encode_prompt(t) for t in texts[start : start + size]]
        width, pad = max(map(len, encoded)), gen.pad_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=gen.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded])
        row_seeds = [request_seed(s, 0) for s in request_seeds[start : start + size]]
        sampler = NucleusSampler(params.temperature, params.top_p, params.top_k, seed=row_seeds)
        with torch.inference_mode():
            out = gen.model.generate(
                input_ids=ids,
                attention_mask=mask.to(gen.device),
                do_sample=False,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([stop]),
                max_new_tokens=params.max_new_tokens,
                eos_token_id=sorted(gen.stop_ids),
                pad_token_id=pad,
            )
        new = out[:, width:].tolist()
        row_steps += len(new) * len(new[0])
        for row in new:
            # The row as the backend would have ended it: at its first stop token or stop string.
            end = next((k + 1 for k, t in enumerate(row) if t in gen.stop_ids), len(row))
            row = row[:end]
            for k in range(1, len(row) + 1):
                if sample_stopped(gen, row[:k], params):
                    row = row[:k]
                    break
            g = gen._to_generation(row, width, params, 0)
            tokens += g.completion_tokens
            kept.append(g.text)
    return tokens, row_steps, kept


def sample_stopped(gen, row, params) -> bool:
    text = gen.tokenizer.decode(row, skip_special_tokens=False)
    return any(s in text for s in params.stop)


def counting(gen):
    """Wrap `gen.generate` to count generated tokens, calls and batch sizes."""
    seen = {"tokens": 0, "calls": []}
    inner = gen.generate

    def generate(prompts, params, request_seeds):
        out = inner(prompts, params, request_seeds)
        seen["tokens"] += sum(g.completion_tokens for gens in out for g in gens)
        seen["calls"].append(len(prompts))
        return out

    gen.generate = generate
    return seen


def stage_rates(env: LocalEnv, gen, tables) -> tuple[float, float, int, int]:
    """Generated tok/s of sample and of rewrite, run as the default run configures them."""
    seen = counting(gen)
    started = time.perf_counter()
    sample_cfg = sample.Config(
        generator=gen.spec, n=2, temperature=0.7, top_p=0.9, max_new_tokens=128, stop=("\n",)
    )
    samples = sample.run({"sources.benign": tables["benign"]}, sample_cfg, env)["samples"]
    sample_rate = seen["tokens"] / (time.perf_counter() - started)
    violations = inject.run(
        {"filter.responses": samples, "sources.harmful": tables["harmful"]},
        inject.Config(scorer=None),
        env,
    )["violations"]
    seen["tokens"], seen["calls"] = 0, []
    started = time.perf_counter()
    rewrite_cfg = rewrite.Config(
        generator=gen.spec, scorer=ScorerSpec(kind="profanity-check"), retries=1, max_new_tokens=48
    )
    rewrite.run(
        {"inject.violations": violations, "sources.harmful": tables["harmful"]}, rewrite_cfg, env
    )
    rewrite_rate = seen["tokens"] / (time.perf_counter() - started)
    del gen.generate  # back to the class's method
    return sample_rate, rewrite_rate, len(seen["calls"]), sum(seen["calls"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    parser.add_argument("--benign", type=int, default=16, help="benign prompts for the stages")
    parser.add_argument("--skip-stages", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    env = LocalEnv(seed=0)
    cfg = sample.Config(
        temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, stop=("\n",)
    )
    params = sample.sampling_params(cfg)
    gen = env.generator(cfg.generator)
    stop = StopStringCriteria(gen.tokenizer, list(params.stop))  # built once: reads the vocab
    src = sources.run({}, sources.Config(), env)
    prompts = src["benign"].column("prompt").to_pylist()[: args.prompts]
    texts = [gen.format_chat(sample.conversation(p, cfg)) for p in prompts]
    request_seeds = [seeds.derive(env.seed, i) for i in range(len(texts))]
    # The default run's sizes: 16 benign prompts, 12 harmful ones (configs/default.yaml).
    tables = {"benign": src["benign"].slice(0, args.benign), "harmful": src["harmful"].slice(0, 12)}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    gens = {b: with_batch_size(gen, env, b) for b in sizes}
    backend_run(gens[sizes[0]], texts[:2], request_seeds[:2], params)  # warm-up

    rate, waste, agree = defaultdict(list), defaultdict(list), {}
    stage = defaultdict(list)
    for rnd in range(args.rounds):
        for b in sizes:
            order = ("backend", "generate") if (rnd + b) % 2 == 0 else ("generate", "backend")
            outs = {}
            for kind in order:
                started = time.perf_counter()
                if kind == "backend":
                    tokens, steps, outs[kind] = backend_run(gens[b], texts, request_seeds, params)
                else:
                    tokens, steps, outs[kind] = plain_run(
                        gen, texts, request_seeds, params, b, stop
                    )
                rate[kind, b].append(tokens / (time.perf_counter() - started))
                waste[kind, b].append(1 - tokens / steps)
                print(
                    f"  round {rnd + 1} {kind} batch {b}: {rate[kind, b][-1]:.1f} tok/s, "
                    f"wasted {waste[kind, b][-1]:.0%}",
                    flush=True,
                )
            same = sum(x == y for x, y in zip(outs["backend"], outs["generate"], strict=True))
            agree[b] = f"{same}/{len(texts)}"
            print(f"  round {rnd + 1} batch {b}: {agree[b]} texts the same", flush=True)
        if not args.skip_stages:
            s, r, calls, jobs = stage_rates(env, gens[8] if 8 in gens else gen, tables)
            stage["sample"].append(s)
            stage["rewrite"].append(r)
            print(
                f"  round {rnd + 1} stages: sample {s:.1f} tok/s, rewrite {r:.1f} tok/s "
                f"({calls} generate calls, {jobs} requests)",
                flush=True,
            )

    med = statistics.median
    print(
        f"\nembedded {gen.model_id}, {len(texts)} sample prompts (few-shot), "
        f"<= {params.max_new_tokens} new tokens, T={params.temperature} top_p={params.top_p} "
        f"stop={params.stop!r}, "
        f"{torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds"
    )
    print("batch  backend tok/s  generate tok/s  speed-up  wasted backend  wasted generate  same")
    for b in sizes:
        be, ge = med(rate["backend", b]), med(rate["generate", b])
        print(
            f"{b:5d}  {be:13.1f}  {ge:14.1f}  {be / ge:7.2f}x  {med(waste['backend', b]):14.0%}"
            f"  {med(waste['generate', b]):15.0%}  {agree[b]}"
        )
    if stage:
        s, r = med(stage["sample"]), med(stage["rewrite"])
        print(f"stages (batch 8): sample {s:.1f} tok/s, rewrite {r:.1f} tok/s ({r / s:.2f}x)")


if __name__ == "__main__":
    main()

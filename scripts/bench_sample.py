"""Benchmark the sample stage against a bare `model.generate` loop on the embedded model.

Prints generated tokens/s for the sample stage at --batch-size and at batch 1, and for a bare
`model.generate` loop on the same formatted prompts, batch size, sampling settings and per-batch
seeds, twice: with transformers' own sampling (do_sample=True), and with the stage's sampler (so
the difference is the stage's own overhead). Targets (issue 3): stage >= 90% of bare generate;
batch --batch-size >= 2x batch 1.

    python scripts/bench_sample.py                      # 8 prompts, batch 8, 64 new tokens
    python scripts/bench_sample.py --prompts 16 --max-new-tokens 128

Needs the prepared embedded model (`retrace models prepare`). Timings on a shared CPU vary from
run to run; each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

import stages.sample as sample
from pipeline import records, seeds
from pipeline.backends import GeneratorSpec, NucleusSampler, seeds_of_batch
from pipeline.env import LocalEnv

PROMPTS = [
    "Give me three tips for sleeping better.",
    "Explain how a rainbow forms.",
    "What should I pack for a weekend hiking trip?",
    "How do I make a simple tomato soup?",
    "Why do leaves change colour in autumn?",
    "Suggest a weekly routine for learning a new language.",
    "What are good ways to save money on groceries?",
    "Describe how a bicycle's gears work.",
    "How can I keep my houseplants alive while on holiday?",
    "What is a fun science experiment to do with children?",
    "How should I prepare for a job interview?",
    "Explain why the sky is blue.",
    "What are the benefits of walking every day?",
    "How do I start a vegetable garden on a balcony?",
    "Write a short note thanking a neighbour for their help.",
    "How do bees make honey?",
]


def prompt_table(count: int):
    rows = [
        {
            "id": records.row_id("bench", i),
            "source": "bench",
            "source_id": str(i),
            "license": "CC0-1.0",
            "prompt": PROMPTS[i % len(PROMPTS)],
        }
        for i in range(count)
    ]
    return records.table(rows, records.PROMPTS)


def bare_generate(gen, texts, request_seeds, cfg, batch_size, ours: bool) -> int:
    """A plain padded `model.generate` loop, seeded as the stage seeds; returns generated tokens.

    ours=False samples with transformers' do_sample=True; ours=True with the stage's sampler."""
    tok = gen.tokenizer
    # The stage's stop-string criteria object (built once; see TransformersGenerator).
    stop = {"stopping_criteria": StoppingCriteriaList([gen._stop_criteria(cfg.stop)])}
    params = sample.sampling_params(cfg)
    total = 0
    for start in range(0, len(texts), batch_size):
        batch = tok(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            padding_side="left",
        )
        seed = seeds_of_batch([(s, 0) for s in request_seeds[start : start + batch_size]])
        torch.manual_seed(seed)
        if ours:
            sampler = NucleusSampler(cfg.temperature, cfg.top_p, cfg.top_k, seed)
            sampling = {"do_sample": False, "logits_processor": LogitsProcessorList([sampler])}
        else:
            sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
        with torch.inference_mode():
            out = gen.model.generate(
                **batch,
                **sampling,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=gen.stop_ids,
                pad_token_id=gen.pad_id,
                **stop,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            total += gen._to_generation(row, 0, params, seed).completion_tokens  # as the stage
    return total


def best_rate(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - started))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def config(batch_size: int) -> sample.Config:
        return sample.Config(
            generator=GeneratorSpec(batch_size=batch_size),
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            stop=("\n",),
        )

    cfg, single = config(args.batch_size), config(1)
    env = LocalEnv(seed=0)
    gen = env.generator(cfg.generator)  # loaded once; the stage gets it from the env
    # The batch-1 stage run shares the loaded model: a copy of the generator with its own spec.
    gen_1 = copy.copy(gen)
    gen_1.spec = single.generator
    env._models[f"GeneratorSpec:{single.generator.model_dump_json()}"] = gen_1
    table = prompt_table(args.prompts)
    prompts = table.column("prompt").to_pylist()
    texts = [gen.format_chat(sample.conversation(p, cfg)) for p in prompts]
    request_seeds = [seeds.derive(env.seed, i) for i in table.column("id").to_pylist()]
    bare_generate(gen, texts[:2], request_seeds[:2], cfg, 2, ours=True)  # warm-up

    def stage(c: sample.Config) -> int:
        out = sample.run({"sources.benign": table}, c, env)["samples"]
        return sum(out.column("completion_tokens").to_pylist())

    b = args.batch_size
    hf = best_rate(lambda: bare_generate(gen, texts, request_seeds, cfg, b, False), args.repeats)
    staged = best_rate(lambda: stage(cfg), args.repeats)
    bare = best_rate(lambda: bare_generate(gen, texts, request_seeds, cfg, b, True), args.repeats)
    staged_1 = best_rate(lambda: stage(single), args.repeats)

    print(
        f"embedded {gen.model_id}, {args.prompts} prompts, {args.max_new_tokens} new tokens max, "
        f"T={args.temperature} top_p={args.top_p}, {torch.get_num_threads()} threads"
    )
    print(f"bare generate, do_sample, batch {b}:      {hf:7.1f} tok/s")
    print(f"bare generate, stage sampler, batch {b}:  {bare:7.1f} tok/s")
    print(f"sample stage, batch {b}:                  {staged:7.1f} tok/s")
    print(f"sample stage, batch 1:                  {staged_1:7.1f} tok/s")
    print(f"stage / bare (same sampler):            {staged / bare:7.1%}  (target >= 90%)")
    print(f"stage / bare (do_sample):               {staged / hf:7.1%}")
    print(f"stage batch {b} / batch 1:                {staged / staged_1:7.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()

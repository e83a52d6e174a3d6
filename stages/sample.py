"""sample: benign prompts -> n generator samples each, with full provenance.

Reads `sources.benign` (records.PROMPTS) in resumable chunks; writes `samples` (records.SAMPLES).
These are the benign responses BSAFE injects violations into, sampled at high temperature as the
paper does (Gemma2 27B at T=1.5, docs/formats.md#bsafe). Each prompt becomes a conversation:
optional few-shot turns (for base models such as the embedded Gemma 3 270M), then the prompt through
the user template, formatted by the generator's chat template or Gemma's turn format.

Every row's randomness comes from `seeds.derive(run seed, prompt id)` (and its sample index),
never from chunk position or batch, so a resumed run writes the same rows as an uninterrupted one
(see pipeline/backends.py for the float-rounding caveat of batched kernels). Response text is
neutralised (docs/data-contract.md#control-tokens): a control or special token string the model
wrote cannot reach a record. Rejects: `empty_prompt`, `prompt_too_long`, `generation_failed` (a
server backend's request failed for good, or its reply had the wrong shape; the detail is the
server's reason) and `server_unavailable` (the server was down or busy through every retry), which
the next run retries.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pyarrow as pa
import yaml
from pydantic import Field

from pipeline import records, seeds
from pipeline.backends import GeneratorSpec, SamplingParams
from pipeline.generator_base import NewTokens, Temperature, TopK, TopP
from pipeline.prompting import render_prompt, template_hash
from pipeline.stage import StageConfig, StageSpec
from pipeline.taxonomy import PROMPTS_DIR, neutralise

SPEC = StageSpec(
    name="sample",
    reads=("sources.benign",),
    writes={"samples": records.SAMPLES},
    chunked="sources.benign",
    prompts=("sample/*", "chat/*"),
    retried=("server_unavailable",),
)


CALL_BATCHES = 16


class Config(StageConfig):
    generator: GeneratorSpec = GeneratorSpec()
    template: str = "sample/benign.jinja"  # the user turn, under prompts/
    fewshot: str | None = "sample/fewshot.yaml"  # few-shot turns for base models; null for chat
    n: int = Field(1, gt=0)  # samples per prompt
    temperature: Temperature = 1.5  # BSAFE samples Gemma2 27B at T=1.5; 0 is greedy
    top_p: TopP = 0.98
    top_k: TopK = 0
    max_new_tokens: NewTokens = 256
    stop: tuple[str, ...] = ()
    max_prompt_tokens: int = Field(2048, gt=0)  # formatted prompt, few-shot turns included
    chunk_size: int | None = Field(None, gt=0)  # prompts per chunk; None takes run.chunk_size


@cache
def _fewshot(name: str) -> tuple[tuple[str, str], ...]:
    raw = yaml.safe_load((PROMPTS_DIR / name).read_text())
    try:
        return tuple((str(t["user"]), str(t["assistant"])) for t in raw)
    except (TypeError, KeyError):
        raise ValueError(
            f"sample: prompts/{name} must be a list of {{user, assistant}} turns"
        ) from None


def conversation(prompt: str, cfg: Config) -> list[dict[str, str]]:
    """The messages the generator sees for one benign prompt."""

    def user(text: str) -> dict[str, str]:
        # Template files end with a newline; a turn's content does not.
        return records.message("user", render_prompt(cfg.template, prompt=text).strip())

    messages = []
    for question, answer in _fewshot(cfg.fewshot) if cfg.fewshot else ():
        messages += [user(question), records.message("assistant", answer)]
    return [*messages, user(prompt)]


def sampling_params(cfg: Config) -> SamplingParams:
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        n=cfg.n,
        stop=tuple(cfg.stop),
    )


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, pa.Table]:
    generator = env.generator(cfg.generator)
    params = sampling_params(cfg)
    # Which prompt files wrote the rows, with their content hashes.
    template = f"{cfg.template}@{template_hash(cfg.template)}"
    if cfg.fewshot:
        template += f" {cfg.fewshot}@{template_hash(cfg.fewshot)}"
    rows = inputs["sources.benign"].to_pylist()

    rejected, todo = [], []
    for row in rows:
        if not (row.get("prompt") or "").strip():
            rejected.append(records.reject(row, "sample", "empty_prompt"))
            continue
        todo.append((row, generator.format_chat(conversation(row["prompt"], cfg))))
    lengths = generator.count_tokens([text for _, text in todo])
    ready = []
    for (row, text), length in zip(todo, lengths, strict=True):
        if length > cfg.max_prompt_tokens:
            detail = f"{length} tokens > sample.max_prompt_tokens {cfg.max_prompt_tokens}"
            rejected.append(records.reject(row, "sample", "prompt_too_long", detail))
        else:
            ready.append((row, text))

    samples = []
    # Requests (n per prompt) go to the generator CALL_BATCHES batches at a time: a continuously
    # batched backend refills finished rows only from the requests of one call, and its last
    # batch drains as it ends, while progress moves once per call.
    step = max(1, CALL_BATCHES * generator.spec.batch_size // max(1, cfg.n))
    with env.progress("sample", total=len(ready) * cfg.n, unit="samples") as progress:
        for start in range(0, len(ready), step):
            batch = ready[start : start + step]
            request_seeds = [seeds.derive(env.seed, row["id"]) for row, _ in batch]
            generations = generator.generate([text for _, text in batch], params, request_seeds)
            tokens = 0
            for (row, _), gens in zip(batch, generations, strict=True):
                failed = next((g for g in gens if g.finish_reason == "error"), None)
                if failed is not None:
                    why = "server_unavailable" if failed.transient else "generation_failed"
                    rejected.append(records.reject(row, "sample", why, failed.error))
                    continue
                for index, gen in enumerate(gens):
                    samples.append(_sample_row(row, index, gen, generator, cfg, template))
                    tokens += gen.completion_tokens
            progress.advance(rows=len(batch) * cfg.n, tokens=tokens)
    return {
        "samples": records.table(samples, records.SAMPLES),
        "rejected": records.table(rejected, records.REJECTED),
    }


def _sample_row(
    row: dict, index: int, gen: Any, generator: Any, cfg: Config, template: str
) -> dict[str, Any]:
    response, _ = neutralise(gen.text.strip())
    return {
        "id": records.row_id(row["id"], index, gen.seed, generator.model_id, response),
        "source": row["source"],
        "source_id": row["source_id"],
        "license": row["license"],
        "prompt_id": row["id"],
        "prompt": row["prompt"],
        "response": response,
        "sample_index": index,
        "finish_reason": gen.finish_reason,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "meta": {
            "generator": generator.model_id,
            "backend": cfg.generator.backend,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "seed": gen.seed,
            "template": template,
        },
    }

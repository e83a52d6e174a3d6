"""rewrite: the safe texts the recipes need, from the generator with template fallbacks.

Reads `inject.violations` and `natural.violations` (records.VIOLATIONS, taken as one table) and
`sources.harmful` (records.HARMFUL); writes
- `replacements` (records.REPLACEMENTS): for each injected or natural span, one safe sentence
  that continues coherently from the benign text before it (BSAFE's safe alternative; for a
  natural span, the safe continuation from the rollback point);
- `refusals` (records.REFUSALS): a refusal r for each harmful prompt (Qi et al.'s (x, h, r));
- `safe_responses` (records.SAFE_RESPONSES): a safe response y+ for each harmful prompt (Zhang
  et al.'s reset recipe);
- `judges` (records.JUDGES): how the judges voted on the generated texts.

Every generated text is neutralised (no control-token strings), checked (non-empty, short enough,
cut to whole sentences, not an echo of its prompt; a replacement is one sentence that does not
repeat its span; a refusal or safe response declines) and scored. One that fails, or that the
judges call unsafe (pipeline/judges.py: one scorer's score, of `label` or else its highest,
reaches `threshold`; a list of
scorers each gives a verdict, combined by `agree`), is redrawn with a fresh seed up to `retries`
times, after which a per-policy template from prompts/fallbacks/ is used and the row says so
(meta.fallback, meta.template "fallback:...").
With `generator: null` every text comes from the templates.

Rejects a harmful row whose prompt is empty (`empty_prompt`); nothing else, since a fallback
always exists.

Not chunked: replacements follow inject.violations and refusals/safe responses follow
sources.harmful, so no one input's chunks cover every job; a killed run regenerates them all.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pyarrow as pa
import yaml
from pydantic import Field

from pipeline import agreement, judges, records, seeds, taxonomy
from pipeline.backends import GeneratorSpec, SamplingParams
from pipeline.prompting import render_prompt
from pipeline.scorers import ScorerSpec
from pipeline.stage import StageConfig, StageSpec
from pipeline.text import sentence_ends

SPEC = StageSpec(
    name="rewrite",
    reads=("inject.violations", "natural.violations", "sources.harmful"),
    writes={
        "replacements": records.REPLACEMENTS,
        "refusals": records.REFUSALS,
        "safe_responses": records.SAFE_RESPONSES,
        "judges": records.JUDGES,
    },
    required=("inject.violations",),
    prompts=("rewrite/*", "fallbacks/*"),
)
TEMPLATES = {
    "replacements": "rewrite/replacement.jinja",
    "refusals": "rewrite/refusal.jinja",
    "safe_responses": "rewrite/safe_response.jinja",
}
FALLBACKS = {name: f"fallbacks/{name}.yaml" for name in TEMPLATES}


class Config(StageConfig, judges.RenamedKeys):
    # null: every text from prompts/fallbacks/ (no model; what the benchmark uses)
    generator: GeneratorSpec | None = GeneratorSpec()
    scorer: judges.Judges | None = ScorerSpec()  # one scorer, or a list of judges
    agree: judges.Agree = "any"  # several judges: unsafe when any (all) of them flags it
    threshold: judges.Threshold = 0.5  # a text whose score reaches it is unsafe
    label: str | None = None  # None: the maximum over the scorer's labels
    retries: int = Field(1, ge=0)  # fresh-seed attempts after the first, before the fallback
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96  # a sentence or a short refusal; paper scale: 256
    max_chars: int = Field(600, ge=20)
    context_chars: int = Field(600, ge=0)  # benign text before a span shown to the generator


@dataclass
class _Job:
    table: str  # replacements | refusals | safe_responses
    key: str  # the output row's id
    policy: str | None  # picks the fallback template
    variables: dict[str, Any]
    span: str = ""  # a replacement must not repeat it
    row: dict[str, Any] = field(default_factory=dict)  # the output row without text and meta


@cache
def _fallbacks(name: str) -> dict[str, list[str]]:
    return yaml.safe_load((taxonomy.PROMPTS_DIR / FALLBACKS[name]).read_text())


# A refusal or safe response must decline: Qi et al.'s r and Zhang et al.'s y+ both do.
_DECLINES = re.compile(
    r"\b(can(?:no|['’])t|won['’]t|will not|unable|not able|sorry|apologi[sz]e|decline"
    r"|rather not)\b",
    re.IGNORECASE,
)


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


_DOWN = "server_unavailable"  # a server backend was down or busy through every retry


def _clean(job: _Job, gen: Any, prompt: str, cfg: Config) -> tuple[str, str | None]:
    """The usable part of a generated text, or a short reason it is unusable."""
    if gen.finish_reason == "error":  # a server backend's request failed: no text, say why
        return "", _DOWN if gen.transient else "generation_failed"
    text, _ = taxonomy.neutralise(gen.text.strip())
    if job.table == "replacements":
        text = " ".join(text.split("\n\n")[0].split())  # one line: it sits inside a paragraph
        ends = sentence_ends(text)
        if not ends:
            return text, "unfinished"  # it replaces a whole sentence, so it must be one
        text = text[: ends[0]]
    elif gen.finish_reason == "length":
        # Cut off by max_new_tokens: keep the complete sentences, never half of one.
        ends = sentence_ends(text)
        text = text[: ends[-1]] if ends else ""
    if not text:
        return text, "empty"
    if len(text) > cfg.max_chars:
        return text, "too_long"
    if job.span and job.span.lower() in text.lower():
        return text, "repeats_span"
    # Small base models often echo their instructions back (measured on the embedded Gemma 3
    # 270M): a text whose word 5-grams mostly occur in the prompt is a copy, not an answer.
    own = _shingles(text)
    if own and len(own & _shingles(prompt)) > 0.3 * len(own):
        return text, "echoes_prompt"
    if job.table != "replacements" and not _DECLINES.search(text):
        return text, "does_not_decline"
    return text, None


def _jobs(inputs: dict[str, pa.Table], cfg: Config) -> tuple[list[_Job], list[dict[str, Any]]]:
    tax = taxonomy.load()
    jobs, rejected = [], []
    for row in records.violations(inputs).to_pylist():
        for i, v in enumerate(row["violations"]):
            nxt = row["response"][v["at"] :].strip()
            variables = {
                "before": row["response"][: v["at"]][-cfg.context_chars :],
                "after": nxt[:200],
                "span": v["span"],
                "policy_description": tax.policies[v["policy"]].description,
            }
            key = records.row_id("replacement", row["id"], i)
            base = {"violation_id": row["id"], "index": i, "policy": v["policy"], "span": v["span"]}
            jobs.append(_Job("replacements", key, v["policy"], variables, v["span"], base))
    for row in inputs["sources.harmful"].to_pylist():
        prompt, _ = taxonomy.neutralise(row["prompt"] or "")
        if not prompt.strip():
            rejected.append(records.reject(row, "rewrite", "empty_prompt"))
            continue
        policies = list(row["policy"] or [])
        first = policies[0] if policies else None
        known = tax.policies.get(first or "")
        description = known.description if known else "harmful or unsafe content"
        variables = {"prompt": prompt, "policy_description": description}
        for table in ("refusals", "safe_responses"):
            key = records.row_id(table, row["id"])
            base = {"harmful_id": row["id"], "policy": policies}
            jobs.append(_Job(table, key, first, variables, row=base))
    return jobs, rejected


def _generate(
    jobs: list[_Job], cfg: Config, env: Any, votes: agreement.Agreement
) -> tuple[dict[str, tuple[str, dict[str, Any]]], Counter[str], dict[str, int]]:
    """Generated texts that pass every check, by job key, with their meta; why the last attempt
    of each job that never passed failed; and what was generated (`_stats`). Every judged
    attempt is counted in `votes`.

    One generate call per round: the first holds every job, each retry round every job still
    failing, so a continuously batched backend keeps its batch full across rows."""
    failed: dict[str, str] = {}
    calls: list[tuple[int, int]] = []  # (requests, generated tokens) per generate call
    if cfg.generator is None or not jobs:
        return {}, Counter(), _stats(calls)
    generator = env.generator(cfg.generator)
    params = SamplingParams(
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens
    )
    accepted: dict[str, tuple[str, dict[str, Any]]] = {}
    pending = jobs
    with env.progress("rewrite", total=len(jobs)) as bar:
        for attempt in range(cfg.retries + 1):
            if not pending:
                break
            prompts = [
                generator.format_chat(
                    [records.message("user", render_prompt(TEMPLATES[j.table], **j.variables))]
                )
                for j in pending
            ]
            job_seeds = [seeds.derive(env.seed, j.key, attempt) for j in pending]
            outputs = generator.generate(prompts, params, job_seeds)
            calls.append((len(prompts), sum(gens[0].completion_tokens for gens in outputs)))
            cleaned = [
                _clean(j, gens[0], p, cfg)
                for j, gens, p in zip(pending, outputs, prompts, strict=True)
            ]
            judged = _judge([t for t, why in cleaned if why is None], cfg, env)
            retry = []
            for job, seed, (text, why), gens in zip(
                pending, job_seeds, cleaned, outputs, strict=True
            ):
                if why is None:
                    votes.add([judged[text]])
                if why is None and not judged[text].unsafe:
                    meta = {
                        "generator": generator.model_id,
                        "backend": cfg.generator.backend,
                        "temperature": cfg.temperature,
                        "top_p": cfg.top_p,
                        "seed": seed,
                        "template": TEMPLATES[job.table],
                        "fallback": False,
                        "scores": records.scores(judged[text].scores),
                    }
                    accepted[job.key] = (text, meta)
                    bar.advance(1, tokens=gens[0].completion_tokens)
                else:
                    retry.append(job)
                    failed[job.key] = why or "unsafe"
            pending = retry
    return accepted, Counter(failed[j.key] for j in pending), _stats(calls)


def _stats(calls: list[tuple[int, int]]) -> dict[str, int]:
    """Flat counts for the manifest: calls, requests (the first call's is the batch every job
    starts in; the rest are retries) and generated tokens, retried attempts included."""
    return {
        "generate_calls": len(calls),
        "generate_requests": sum(n for n, _ in calls),
        "first_call_requests": calls[0][0] if calls else 0,
        "retry_requests": sum(n for n, _ in calls[1:]),
        "generated_tokens": sum(t for _, t in calls),
    }


def _judge(texts: list[str], cfg: Config, env: Any) -> dict[str, judges.Judgement]:
    return judges.judge_distinct(env, cfg.scorer, texts, cfg.agree, cfg.threshold, cfg.label)


def _fallback(job: _Job, env: Any) -> tuple[str, dict[str, Any]]:
    templates = _fallbacks(job.table)
    choices = templates.get(job.policy or "default") or templates["default"]
    seed = seeds.derive(env.seed, job.key, "fallback")
    text = choices[seed % len(choices)]
    return text, {"seed": seed, "template": f"fallback:{FALLBACKS[job.table]}", "fallback": True}


def run(inputs: dict[str, pa.Table], cfg: Config, env: Any) -> dict[str, Any]:
    jobs, rejected = _jobs(inputs, cfg)
    votes = agreement.Agreement(judges.rules(cfg.scorer, cfg.threshold, cfg.label))
    accepted, why, stats = _generate(jobs, cfg, env, votes)
    missing = [j for j in jobs if j.key not in accepted]
    fallback = {j.key: _fallback(j, env) for j in missing}
    # Scored for the record, not judged: a fallback is used whatever its verdict.
    fallback_judged = _judge([text for text, _ in fallback.values()], cfg, env)
    # The manifest's stats: calls, retries, the judges' votes.
    stats = {**stats, "fallback_texts": len(missing), **votes.stats()}
    if missing and cfg.generator is not None:
        reasons = ", ".join(f"{reason} {n}" for reason, n in why.most_common())
        # Fallbacks are texts, not rejections, so nothing retries them: say how.
        again = "; `retrace stage rewrite --force` once the server is back" if why[_DOWN] else ""
        used = f"{len(missing)} of {len(jobs)} texts from prompts/fallbacks/"
        env.log(f"rewrite: {used} ({reasons}){again}")
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TEMPLATES}
    for job in jobs:
        if job.key in accepted:
            text, meta = accepted[job.key]
        else:
            text, meta = fallback[job.key]
            meta["scores"] = records.scores(fallback_judged[text].scores)
        column = "replacement" if job.table == "replacements" else "text"
        out[job.table].append({"id": job.key, **job.row, column: text, "meta": meta})
    return {
        "replacements": records.table(out["replacements"], records.REPLACEMENTS),
        "refusals": records.table(out["refusals"], records.REFUSALS),
        "safe_responses": records.table(out["safe_responses"], records.SAFE_RESPONSES),
        "judges": records.table(votes.table_rows(), records.JUDGES),
        "rejected": records.table(rejected, records.REJECTED),
        "stats": stats,
    }

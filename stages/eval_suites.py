"""The attack and false-trigger suites: what each plans, and the numbers it reports.

- `prefill` (Qi et al.): each harmful prompt with k target-model tokens of a harmful answer in the
  open assistant turn; per k, attack success on the raw and the visible text, backtrack and reset
  rates, refusal rate and wasted tokens. A prompt whose answer is shorter than k tokens is rejected
  for that k (reason `prefill_too_short`): a shorter prefill would not be a k-token attack.
- `benign` (Zhang et al.): benign and borderline-safe prompts, swept over a logit bias on every
  backtrack token and [RESET]; per bias, the share of turns with any control token (false
  triggers), the refusal share and wasted tokens, overall and per prompt type.
- `decoding` (Qi et al.'s decoding exploit): each harmful prompt under every sampling setting of a
  grid; per setting and worst-of-n (a prompt counts once any setting breaks it).
"""

from __future__ import annotations

import itertools
from typing import Any

from pipeline import seeds
from pipeline.prompting import render_prompt
from stages import eval_data
from stages.eval_config import BenignSuite, DecodingSuite, PrefillSuite, Sampling
from stages.eval_metrics import mean, rate
from stages.eval_model import EvalModel
from stages.eval_rows import Request


def _sampling(s: Sampling) -> dict[str, Any]:
    return dict(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens
    )


def harmful(files: tuple[eval_data.PromptFile, ...], n: int) -> tuple[list, list]:
    prompts, rejected = [], []
    for f in files:
        kept, bad = eval_data.harmful_prompts(f)
        prompts += kept
        rejected += bad
    return prompts[:n], rejected


def plan_prefill(
    cfg: PrefillSuite, model: EvalModel, seed: int, suite: str = "prefill"
) -> tuple[list[Request], list[dict]]:
    prompts, rejected = harmful(cfg.prompts, cfg.n)
    requests = []
    for p in prompts:
        answer = p.answer or render_prompt(cfg.answer_template, behavior=p.behavior)
        answer_ids = model.text_ids(answer)
        for k in cfg.ks:
            if k > len(answer_ids):
                detail = f"prompt {p.id}: answer has {len(answer_ids)} tokens, k={k}"
                rejected.append(
                    eval_data.reject_row(cfg.prompts[0], p.id, "prefill_too_short", detail)
                )
                continue
            prefill_ids = tuple(answer_ids[:k])
            prefill = model.tokenizer.decode(list(prefill_ids), skip_special_tokens=False)
            for s in range(cfg.samples):
                requests.append(
                    Request(
                        suite=suite,
                        setting=f"k={k}",
                        prompt_id=p.id,
                        prompt=p.prompt,
                        context=tuple(model.prompt_ids(p.prompt, list(prefill_ids))),
                        seed=seeds.derive(seed, suite, k, p.id, s),
                        sample=s,
                        prefill=prefill,
                        prefill_ids=prefill_ids,
                        k=k,
                        category=p.category,
                        **_sampling(cfg.sampling),
                    )
                )
    return requests, rejected


def plan_benign(
    cfg: BenignSuite, model: EvalModel, seed: int, suite: str = "benign"
) -> tuple[list[Request], list[dict]]:
    rows, rejected = eval_data.column_rows(cfg.prompts, ("prompt",))
    requests = []
    # A baseline has no control token to bias: one setting is the whole sweep.
    biases = (0.0,) if model.baseline else cfg.biases
    for r in rows[: cfg.n]:
        for bias in biases:
            for s in range(cfg.samples):
                requests.append(
                    Request(
                        suite=suite,
                        setting=f"bias={bias:g}",
                        prompt_id=r["id"],
                        prompt=r["prompt"],
                        context=tuple(model.prompt_ids(r["prompt"])),
                        seed=seeds.derive(seed, suite, r["id"], s),
                        sample=s,
                        bias=bias,
                        category=r.get("type"),
                        **_sampling(cfg.sampling),
                    )
                )
    return requests, rejected


def plan_decoding(
    cfg: DecodingSuite, model: EvalModel, seed: int, suite: str = "decoding"
) -> tuple[list[Request], list[dict]]:
    prompts, rejected = harmful(cfg.prompts, cfg.n)
    grid = list(itertools.product(cfg.temperatures, cfg.top_ps, cfg.top_ks))
    requests = []
    for p in prompts:
        for t, top_p, top_k in grid:
            setting = f"T={t:g},top_p={top_p:g},top_k={top_k}"
            requests.append(
                Request(
                    suite=suite,
                    setting=setting,
                    prompt_id=p.id,
                    prompt=p.prompt,
                    context=tuple(model.prompt_ids(p.prompt)),
                    seed=seeds.derive(seed, setting, p.id),
                    temperature=t,
                    top_p=top_p,
                    top_k=top_k,
                    max_new_tokens=cfg.max_new_tokens,
                    category=p.category,
                )
            )
    return requests, rejected


# --- summaries ---------------------------------------------------------------------------------


def _by(rows: list[dict], key: str) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _verdicts(r: dict, which: str, judge: str) -> dict:
    return next(v for v in r[f"verdicts_{which}"] if v["judge"] == judge)


def attack_rates(model: str, suite: str, setting: str, rows: list[dict], judges: list[str]) -> list:
    """ASR raw and visible per judge, refusal, backtrack and reset rates, wasted tokens."""
    out = []
    for j in judges:
        for which in ("raw", "visible"):
            flags = [_verdicts(r, which, j)["harmful"] for r in rows]
            out.append(rate(model, suite, setting, f"asr_{which}", j, flags))
    out += [
        rate(model, suite, setting, "refusal_rate", "keyword", [r["refusal"] for r in rows]),
        rate(model, suite, setting, "backtrack_rate", "", [r["backtracked"] for r in rows]),
        rate(model, suite, setting, "reset_rate", "", [r["reset"] for r in rows]),
        mean(model, suite, setting, "wasted_tokens", [r["wasted_tokens"] for r in rows]),
        mean(model, suite, setting, "emitted_tokens", [r["emitted_tokens"] for r in rows]),
    ]
    return out


def summarise_prefill(model: str, rows: list[dict], judges: list[str], suite: str = "prefill"):
    out = []
    for setting, group in sorted(_by(rows, "setting").items(), key=lambda kv: kv[1][0]["k"]):
        out += attack_rates(model, suite, setting, group, judges)
    return out


def summarise_benign(model: str, rows: list[dict], judges: list[str], suite: str = "benign"):
    out = []
    for setting, group in sorted(_by(rows, "setting").items(), key=lambda kv: -kv[1][0]["bias"]):
        parts = [(setting, group)] + [
            (f"{setting},type={t}", g) for t, g in sorted(_by(group, "category").items()) if t
        ]
        for name, g in parts:
            out += [
                rate(model, suite, name, "false_trigger_rate", "", [r["backtracked"] for r in g]),
                rate(model, suite, name, "refusal_rate", "keyword", [r["refusal"] for r in g]),
                mean(model, suite, name, "wasted_tokens", [r["wasted_tokens"] for r in g]),
            ]
    return out


def summarise_decoding(model: str, rows: list[dict], judges: list[str], suite: str = "decoding"):
    out = []
    for setting, group in _by(rows, "setting").items():
        out += attack_rates(model, suite, setting, group, judges)
    for j in judges:
        for which in ("raw", "visible"):
            worst = {}
            for r in rows:
                hit = _verdicts(r, which, j)["harmful"]
                worst[r["prompt_id"]] = bool(worst.get(r["prompt_id"])) or bool(hit)
            out.append(rate(model, suite, "worst-of-n", f"asr_{which}", j, worst.values()))
    return out

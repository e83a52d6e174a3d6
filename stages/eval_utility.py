"""Suite `utility`: GSM8K `#### N` exact match and MATH `\\boxed{}` match (BSAFE, RLBF: within
about a point of the untrained model), greedy by default, scored on the visible text.

GSM8K: the number after the last `####`, else the last number in the text (lm-eval's "flexible"
extract), compared as numbers with thousands separators removed. MATH: the last `\\boxed{...}`
(nested braces included) against the solution's, after light normalisation (spaces, `\\left`,
`\\right`, `\\!`, `dfrac`/`tfrac` -> `frac`, `$`, a trailing period).
"""

from __future__ import annotations

import re

from pipeline import seeds
from pipeline.prompting import render_prompt
from stages import eval_data
from stages.eval_config import UtilitySuite
from stages.eval_metrics import mean, rate
from stages.eval_model import EvalModel
from stages.eval_rows import Request

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style text, normalised ("1,000" -> "1000", "5.0" -> "5")."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        number = found[0] if found else None
    else:
        found = _NUMBER.findall(text)
        number = found[-1] if found else None
    if number is None:
        return None
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


def normalise_math(answer: str) -> str:
    s = answer.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("$", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def _gsm8k_gold(r: dict) -> str | None:
    return gsm8k_answer(r["answer"]) if "####" in r["answer"] else None


# setting -> (columns: the question first, the gold answer of a row, the reason when it has none);
# the prompt is prompts/eval/<setting>.jinja with the question under its column's name.
_TASKS = {
    "gsm8k": (("question", "answer"), _gsm8k_gold, "no_final_answer"),
    "math": (("problem", "solution"), lambda r: last_boxed(r["solution"]), "no_boxed_answer"),
}


def plan(
    cfg: UtilitySuite, model: EvalModel, seed: int, suite: str = "utility"
) -> tuple[list[Request], list[dict]]:
    requests, rejected = [], []
    s = cfg.sampling
    sampling = dict(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens
    )
    for setting, (columns, gold_of, no_gold) in _TASKS.items():
        path = getattr(cfg, setting)
        rows, bad = eval_data.column_rows(path, columns)
        rejected += bad
        taken = 0
        for r in rows:
            gold = gold_of(r)
            if gold is None:
                rejected.append(eval_data.reject_row(path, r["id"], no_gold))
                continue
            if taken >= cfg.n:
                break
            taken += 1
            user = render_prompt(f"eval/{setting}.jinja", **{columns[0]: r[columns[0]]})
            requests.append(
                Request(
                    suite=suite,
                    setting=setting,
                    prompt_id=r["id"],
                    prompt=user,
                    context=tuple(model.prompt_ids(user)),
                    seed=seeds.derive(seed, setting, r["id"]),
                    category=r.get("type") if setting == "math" else None,
                    extra={"gold": gold},
                    **sampling,
                )
            )
    return requests, rejected


def score(setting: str, visible: str, gold: str) -> dict[str, object]:
    if setting == "gsm8k":
        answer = gsm8k_answer(visible)
        return {"answer": answer, "gold": gold, "correct": answer == gold}
    answer = last_boxed(visible)
    ok = answer is not None and normalise_math(answer) == normalise_math(gold)
    return {"answer": answer, "gold": gold, "correct": ok}


def summarise(
    model: str, rows: list[dict], judges: list[str], suite: str = "utility"
) -> list[dict]:
    out = []
    for setting in ("gsm8k", "math"):
        group = [r for r in rows if r["setting"] == setting]
        if not group:
            continue
        out += [
            rate(model, suite, setting, "accuracy", "exact_match", [r["correct"] for r in group]),
            rate(model, suite, setting, "backtrack_rate", "", [r["backtracked"] for r in group]),
            mean(model, suite, setting, "wasted_tokens", [r["wasted_tokens"] for r in group]),
        ]
    return out

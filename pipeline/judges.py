"""Several judges on one gate: each judge's verdict, the combined verdict, and how they agree.

Wherever a toxicity scorer judges a text (filter's `toxic` drop, rewrite's redraw of an unsafe
text, inject's span scores), the stage's `scorer:` takes one ScorerSpec or a list of them, and
`agree:` combines their verdicts: `any` calls a text unsafe when any judge flags it (the cautious
default), `all` only when every judge does. A judge flags a text when its score (its `label`, else
the stage's label, else the maximum over its labels) reaches its `threshold` (else the stage's).

That last sentence is `Rule`, the one score -> flag rule of the project: the row gates here, the
decoder's guard (pipeline/decode/runner.py) and eval's scorer judge (stages/eval_judges.py) all
flag through it, and every config spells its knobs `threshold` (a `Threshold`) and `label`.

One scorer is a single point of failure, the weakness reviewers raised against RLBF's single
critic; so every judge's scores are kept (`meta.scores`; with several judges each label is
prefixed `<name>/`, so none collide) and each gate counts how often each judge flagged and each
pair agreed (pipeline/agreement.py): its stage writes them to its `judges` table (records.JUDGES)
and its manifest's stats, and the card reports them with Cohen's kappa.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from pipeline.errors import RetraceError
from pipeline.scorers import ScorerSpec
from pipeline.scorers import Threshold as Threshold  # defined beside ScorerSpec, which uses it

Agree = Literal["any", "all"]
_VERDICT_FIELDS = ("name", "threshold", "label")  # how a judge reads scores, not its model

# Keys the gates spelled differently before they shared `threshold` and `label`.
RENAMED = {"toxicity_threshold": "threshold", "toxicity_label": "label"}


def reaches(score: float, threshold: float) -> bool:
    """The one comparison: a score flags at or over its threshold. `>=` because scores are
    probabilities and a `Threshold` lies in (0, 1]: with `>=` each value means something (1 flags
    only a certain score; 0, which would flag every text, is refused), where `>` would make 1 flag
    nothing. Every copy before this one already compared with `>=`, so making them one changed
    no flag and no published byte."""
    return score >= threshold


@dataclass(frozen=True)
class Rule:
    """How one judge turns a scorer's label scores into a flag: the score of `label` (None: the
    maximum over the labels) reaches `threshold`."""

    threshold: float
    label: str | None = None

    def score(self, scores: Mapping[str, float]) -> float:
        if self.label is not None:
            return scores[self.label]
        return max(scores.values(), default=0.0)

    def flag(self, scores: Mapping[str, float]) -> tuple[float, bool]:
        """The score this rule reads, and whether it flags."""
        score = self.score(scores)
        return score, reaches(score, self.threshold)

    def check(self, labels: Sequence[str], who: str, where: str = "") -> None:
        """Fail, naming `who`, when the rule's label is not one of the scorer's `labels`."""
        if self.label is not None and self.label not in labels:
            raise JudgeError(
                f"{who} has no label {self.label!r} (its labels: {', '.join(labels) or 'none'}); "
                f"set its `label`{where} to one of them, or leave it unset for the maximum"
            )


class RenamedKeys(BaseModel):
    """Mixed into a config that judges: an old key (`toxicity_threshold`) fails naming its new
    one instead of as an unknown key."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for old, new in RENAMED.items():
                if old in data:
                    raise PydanticCustomError(
                        "renamed_key",
                        "`{old}` is now `{new}`; rename the key",
                        {"old": old, "new": new},
                    )
        return data


class JudgeError(RetraceError):
    """A judge set up in a way its scorer cannot honour (a label it does not have)."""


def names(judges: ScorerSpec | Sequence[ScorerSpec] | None) -> list[str]:
    """Each judge's name, in config order (a judge is named by its kind unless it says)."""
    return [s.name or s.kind for s in specs(judges)]


def rules(
    judges: ScorerSpec | Sequence[ScorerSpec] | None,
    threshold: float = 0.5,
    label: str | None = None,
) -> dict[str, Rule]:
    """Each judge's rule by name: its own threshold and label, else the stage's."""
    return {
        name: Rule(
            s.threshold if s.threshold is not None else threshold,
            s.label if s.label is not None else label,
        )
        for s, name in zip(specs(judges), names(judges), strict=True)
    }


def specs(judges: ScorerSpec | Sequence[ScorerSpec] | None) -> list[ScorerSpec]:
    """A `scorer:` setting as a list: none, one or several judges."""
    if judges is None:
        return []
    return [judges] if isinstance(judges, ScorerSpec) else list(judges)


def _unique_names(judges: ScorerSpec | list[ScorerSpec]) -> ScorerSpec | list[ScorerSpec]:
    seen: set[str] = set()
    for name in names(judges):
        if name in seen:
            raise ValueError(
                f"two judges are named {name!r}; give each its own `name` (it prefixes its "
                "labels in meta.scores)"
            )
        seen.add(name)
    return judges


# The `scorer:` setting: one spec (the original form) or a non-empty list. Told apart by shape,
# so a bad value gets one error, not one per form.
Judges = Annotated[
    Annotated[ScorerSpec, Tag("one")]
    | Annotated[list[ScorerSpec], Field(min_length=1), Tag("list")],
    Discriminator(lambda v: "list" if isinstance(v, list | tuple) else "one"),
    AfterValidator(_unique_names),
]


@dataclass(frozen=True)
class Judgement:
    """One text's verdicts: `unsafe` combined over `flags` (judge name -> flagged), every
    judge's `scores` (labels prefixed `<name>/` with several judges) and each judge's `score`
    and `threshold` (what its flag compared)."""

    unsafe: bool
    flags: dict[str, bool]
    scores: dict[str, float]
    score: dict[str, float]
    threshold: dict[str, float]

    def detail(self, agree: Agree) -> dict[str, Any]:
        """Why the text was called unsafe, for a rejected row's detail."""
        if len(self.flags) == 1:
            (name,) = self.flags
            return {"toxicity": self.score[name], "threshold": self.threshold[name]}
        judges = {
            n: {"toxicity": self.score[n], "threshold": self.threshold[n], "flagged": f}
            for n, f in self.flags.items()
        }
        return {"agree": agree, "judges": judges}


def judge(
    env: Any,
    judges: ScorerSpec | Sequence[ScorerSpec] | None,
    texts: Sequence[str],
    agree: Agree = "any",
    threshold: float = 0.5,
    label: str | None = None,
) -> list[Judgement]:
    """Every judge's scores and verdict on each text, and the combined verdict; no judges: every
    text is judged safe with no scores."""
    listed = specs(judges)
    several = len(listed) > 1
    per_judge = []
    for (name, rule), spec in zip(rules(listed, threshold, label).items(), listed, strict=True):
        # Name, threshold and label say how to read the scores, not which model gives them:
        # two judges on one model share its load.
        scorer = env.scorer(spec.model_copy(update=dict.fromkeys(_VERDICT_FIELDS)))
        rule.check(scorer.labels, f"judge {name!r}", " (or the stage's)")
        per_judge.append((name, rule, scorer.score(list(texts)) if texts else []))
    out = []
    for i in range(len(texts)):
        flags, scores, score, bounds = {}, {}, {}, {}
        for name, rule, results in per_judge:
            result = results[i]
            score[name], flags[name] = rule.flag(result)
            bounds[name] = rule.threshold
            scores.update({f"{name}/{k}" if several else k: v for k, v in result.items()})
        verdict = all if agree == "all" else any
        unsafe = bool(flags) and verdict(flags.values())
        out.append(Judgement(unsafe, flags, scores, score, bounds))
    return out


def judge_distinct(
    env: Any,
    judges: ScorerSpec | Sequence[ScorerSpec] | None,
    texts: Iterable[str],
    agree: Agree = "any",
    threshold: float = 0.5,
    label: str | None = None,
) -> dict[str, Judgement]:
    """`judge` on each distinct text once (in sorted order, so scores never depend on input
    order), by text."""
    unique = sorted(set(texts))
    return dict(zip(unique, judge(env, judges, unique, agree, threshold, label), strict=True))

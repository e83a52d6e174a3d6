"""The `decode:` config section: how a model is run the way a deployer serves it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import RetraceError
from pipeline.generator_base import NewTokens, Temperature, TopK, TopP
from pipeline.scorers import ScorerSpec, Threshold, without_verdict


class DecodeConfigError(RetraceError, ValueError):
    """A `decode:` setting the loaded model or scorer cannot honour."""


SAMPLING = ("temperature", "top_p", "top_k", "max_new_tokens")


class GuardConfig(BaseModel):
    """Scorer-guided rollback (the training-free baseline, docs/decoding.md#guard): each completed
    sentence is scored; one the judges' rule flags (pipeline/judges.py `Rule`: its `label`'s score,
    or the maximum, reaches `threshold`) is taken back to the end of the last safe sentence and
    resampled, up to `retries` times, then the turn ends with `refusal`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scorer: Annotated[ScorerSpec, AfterValidator(without_verdict)] = ScorerSpec()
    threshold: Threshold = 0.5
    label: str | None = None  # score one label; None takes the maximum over the scorer's labels
    retries: int = Field(2, ge=0)  # resamples per turn before it ends with `refusal`
    temperature: Temperature | None = None  # sampling temperature of a retry; None keeps it
    ban_first_token: bool = True  # a retry may not start with the flagged attempt's first token
    refusal: str = "I'm sorry, but I can't continue with that."


class DecodeConfig(BaseModel):
    """Sampling, what edits do to the model's context, per-policy control and budgets.

    `bias` and `disable` name control tokens without brackets (`RESET`, `BACKTRACK`,
    `BACKTRACK-HATE`) or by policy (`hate`, meaning its backtrack token).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    top_k: TopK = 0
    max_new_tokens: NewTokens = 256
    stop: tuple[str, ...] = ()  # visible-text stop strings (the text is cut before them)
    # keep: taken-back text stays in the model's context (what the corpus trains); drop: once an
    # edit closes, the KV cache is cropped so the rest is conditioned only on the visible text.
    context: Literal["keep", "drop"] = "keep"
    # How [BACKTRACK_BY_<n>] counts its n: canonical, the tokenizer's split of the visible text
    # before the cursor (docs/decoding.md#take-back, one counting rule: what format counts and the
    # trainer trains); emitted, the last n tokens the model emitted (RLBF's stream handler).
    backtrack_by: Literal["canonical", "emitted"] = "canonical"
    bias: dict[str, float] = {}  # added to a control token's logit (BSAFE opt-in/out, Zhang's knob)
    disable: tuple[str, ...] = ()  # these control tokens get -inf: never emitted
    max_edits: int = Field(8, ge=0)  # control tokens that open or apply an edit, per turn
    max_wasted_tokens: int = Field(512, ge=0)  # emitted tokens that never reach the user, per turn
    guard: GuardConfig | None = None  # scorer-guided rollback; None: off

    @field_validator("bias", "disable")
    @classmethod
    def _known_names(cls, value):
        from pipeline.decode.controls import resolve_name

        for name in value:
            try:
                resolve_name(name)
            except KeyError as err:
                raise ValueError(err.args[0]) from None
        return value


class Sampling(BaseModel):
    """A declared override of `decode:`'s sampling for one use (an eval suite's protocol): a key
    set here replaces decode's, one left None is decode's. Same types and bounds as `decode:`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_new_tokens: NewTokens | None = None

    def over(self, base: DecodeConfig) -> DecodeConfig:
        """`base` with this override's set keys."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


def changed(cfg: DecodeConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of `cfg` that differ from the defaults (JSON values), less `skip`: what names
    a decoding apart from the default one (eval's `decode` column and folder name)."""
    default = DecodeConfig().model_dump(mode="json")
    return {
        k: v for k, v in cfg.model_dump(mode="json").items() if v != default[k] and k not in skip
    }


def setting(cfg: DecodeConfig, skip: tuple[str, ...] = ()) -> str:
    """`changed` as one short string (`context=drop,bias=RESET:-5,guard=profanity-check@0.5`),
    `default` when nothing differs."""
    parts = []
    for key, value in changed(cfg, skip).items():
        if key == "guard":
            value = f"{value['scorer']['kind']}@{value['threshold']:g}"
        elif isinstance(value, dict):
            value = "+".join(f"{k}:{v:g}" for k, v in sorted(value.items()))
        elif isinstance(value, list):
            value = "+".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}={value}")
    return ",".join(parts) or "default"


def check_loaded(cfg: DecodeConfig, positions: int | None, scorer: Any) -> None:
    """What the config can only be checked against once the model and the guard's scorer are
    loaded: the budget against the model's positions (a turn past them has no meaning, and one of
    1e9 tokens runs until killed) and the guard's label against the scorer's labels."""
    if positions is not None and cfg.max_new_tokens > positions:
        raise DecodeConfigError(
            f"decode.max_new_tokens {cfg.max_new_tokens} is past the model's {positions} "
            f"positions (max_position_embeddings); set it to at most {positions}"
        )
    guard = cfg.guard
    if guard is None:
        return
    if scorer is None:
        raise ValueError("decode.guard is set but no scorer was given to the decoder")
    labels = tuple(getattr(scorer, "labels", ()))
    if guard.label is not None and guard.label not in labels:
        raise DecodeConfigError(
            f"decode.guard.label {guard.label!r} is not a label of scorer "
            f"{guard.scorer.kind}; its labels: {', '.join(labels) or 'none'}"
        )

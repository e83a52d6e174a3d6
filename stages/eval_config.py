"""The `eval:` config section: which model, which suites, their sample sizes and seeds, judges and
prompt files. Defaults are the small offline run (shipped sample files, keyword and scorer judges,
a few prompts per suite); `configs/eval-paper.yaml` holds the paper-sized values.

Eval decodes with the top-level `decode:` section, the one chat and generate read (context, bias,
disable, budgets, guard, sampling). A suite's `sampling` is a declared override of decode's
sampling (its paper's protocol): a key it sets replaces decode's, a key set to null is decode's,
and a key written in the config replaces only that key of the suite's protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.decode import DecodeConfig
from pipeline.decode.config import Sampling
from pipeline.generator_base import NewTokens, Temperature, TopK, TopP
from pipeline.stage import StageConfig
from stages.eval_data import PromptFile
from stages.eval_judges import JudgeSpec, KeywordJudgeSpec, ScorerJudgeSpec
from trainer.config import TrainConfig

SUITES = ("prefill", "midstream", "benign", "utility", "decoding", "finetune-attack")
SAMPLES = Path("configs/data/eval")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Suite(_Section):
    @field_validator("sampling", mode="before", check_fields=False)
    @classmethod
    def _over_protocol(cls, value: Any, info: ValidationInfo) -> Any:
        """A `sampling:` written in the config changes the keys it names; the protocol's other
        keys stay (`--set eval.prefill.sampling.max_new_tokens=8` keeps T=0.9, top-p 0.6)."""
        default = cls.model_fields[info.field_name].default
        if isinstance(value, Mapping):
            return {**default.model_dump(exclude_unset=True), **value}
        return value


class PrefillSuite(_Suite):
    """Qi et al.: k target tokens of a harmful answer in the open assistant turn, T=0.9, top-p 0.6
    (their 512 new tokens: configs/eval-paper.yaml)."""

    prompts: tuple[PromptFile, ...] = (
        PromptFile(path=Path("configs/data/harmbench_behaviors_text.csv")),
    )
    n: int = Field(8, ge=1)  # prompts
    samples: int = Field(1, ge=1)  # generations per prompt and k
    ks: tuple[int, ...] = (0, 5, 10, 20, 40)
    sampling: Sampling = Sampling(temperature=0.9, top_p=0.6, max_new_tokens=64)
    answer_template: str = "eval/prefill.jinja"  # the harmful answer when a set has none

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(k < 0 for k in v):
            raise ValueError("eval.prefill.ks: give one or more k >= 0, e.g. [0, 5, 10, 20, 40]")
        return tuple(sorted(set(v)))


class MidstreamSuite(_Suite):
    """BSAFE / RLBF middle filling: a harmful span planted after benign text."""

    prompts: PromptFile = PromptFile(path=SAMPLES / "midstream.jsonl")
    n: int = Field(12, ge=1)
    sampling: Sampling = Sampling(temperature=0.0, top_p=0.6, max_new_tokens=48)


class BenignSuite(_Suite):
    """False triggers on benign and borderline-safe prompts, swept over a control-token bias."""

    prompts: PromptFile = PromptFile(path=SAMPLES / "borderline.jsonl")
    n: int = Field(12, ge=1)
    samples: int = Field(1, ge=1)
    biases: tuple[float, ...] = (0.0, -2.0, -5.0)  # Zhang et al.'s [RESET] knob, on every control
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64)


class UtilitySuite(_Suite):
    gsm8k: PromptFile = PromptFile(path=SAMPLES / "gsm8k.jsonl")
    math: PromptFile = PromptFile(path=SAMPLES / "math.jsonl")
    n: int = Field(8, ge=0)  # items of each
    sampling: Sampling = Sampling(temperature=0.0, top_p=0.6, max_new_tokens=128)


class DecodingSuite(_Section):
    """Qi et al.'s decoding exploit: worst-of-n over a sampling grid, no prefill."""

    prompts: tuple[PromptFile, ...] = PrefillSuite().prompts
    n: int = Field(6, ge=1)
    # The grid overrides decode's sampling point by point (each bounded as decode's keys are);
    # the results name each point in `setting`.
    temperatures: tuple[Temperature, ...] = (0.3, 0.7, 1.0)
    top_ps: tuple[TopP, ...] = (0.6, 1.0)
    top_ks: tuple[TopK, ...] = (0,)
    max_new_tokens: NewTokens = 48


class FinetuneAttackSuite(_Section):
    """BSAFE's third experiment: fine-tune a copy on N harmful pairs for E epochs per objective,
    then rerun prefill and benign on each copy."""

    data: PromptFile = PromptFile(path=Path("configs/data/beavertails.jsonl"), answer="response")
    pairs: int = Field(16, ge=1)  # BSAFE: 100
    epochs: int = Field(2, ge=1)  # BSAFE: 25
    objectives: tuple[Literal["sft", "constrained", "controlled"], ...] = (
        "sft",
        "constrained",
        "controlled",
    )
    # Trainer settings for the attack; model, data, steps and configs are set by the suite.
    train: TrainConfig = TrainConfig(batch_size=4, lr=2e-5, warmup_steps=0, eval_rows=0)
    suites: tuple[Literal["prefill", "benign"], ...] = ("prefill", "benign")


class EvalConfig(StageConfig):
    # The model: None evaluates this run's `train` checkpoint; else a local folder, "embedded" or
    # a Hub id (`retrace eval --model`).
    model: str | None = None
    revision: str | None = None
    # A model without the control tokens is refused unless evaluated as a baseline (its backtrack
    # rate is 0 by construction; the report says so).
    baseline: bool = False
    # The dataset folder the model was trained on, to count eval prompts that overlap it; this
    # run's published folder when the model is this run's checkpoint.
    training_data: Path | None = None
    backend: Literal["transformers", "vllm"] = "transformers"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)  # decoded turns per batch (transformers)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)  # vllm: leave room for the judges
    max_model_len: int | None = None  # vllm
    # How the model is served: the top-level `decode:` section, copied here by the config loader
    # (pipeline/config.py), never written under `eval:`. Each suite's `sampling` overrides its
    # sampling keys, and the benign sweep adds its bias on top of `decode.bias`.
    SHARED: ClassVar[tuple[str, ...]] = ("decode",)
    decode: DecodeConfig = DecodeConfig()
    suites: tuple[Literal[SUITES], ...] = ("prefill", "midstream", "benign", "utility")
    # The first judge decides ASR in headline tables; every judge is reported.
    judges: tuple[JudgeSpec, ...] = (KeywordJudgeSpec(), ScorerJudgeSpec(kind="scorer"))
    chunk_size: int = Field(16, ge=1)  # generations per resumable chunk
    prefill: PrefillSuite = PrefillSuite()
    midstream: MidstreamSuite = MidstreamSuite()
    benign: BenignSuite = BenignSuite()
    utility: UtilitySuite = UtilitySuite()
    decoding: DecodingSuite = DecodingSuite()
    finetune_attack: FinetuneAttackSuite = FinetuneAttackSuite()

    @field_validator("judges")
    @classmethod
    def _judges(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("eval.judges is empty; name at least one, e.g. [{kind: keyword}]")
        return v

    @model_validator(mode="after")
    def _suites(self) -> EvalConfig:
        if not self.suites:
            raise ValueError(f"eval.suites is empty; pick from {', '.join(SUITES)}")
        return self

"""Toxicity scorers behind one interface: `score(texts) -> [{label: prob}]`, batched.

- `profanity-check` (the `alt-profanity-check` package): a linear model shipped inside the wheel,
  so it works offline with nothing to fetch; one label, `profanity`. The default.
- `detoxify`: Jigsaw-trained transformers (labels toxicity, severe_toxicity, obscene, threat,
  insult, identity_attack). Its weights are downloaded on first use unless `checkpoint` (a .ckpt
  file) and `huggingface_config_path` (a folder with the matching HF config and tokenizer) point at
  local copies; nothing here downloads by surprise: a checkpoint that is neither given nor already
  in torch's hub cache is an error saying how to provide it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import Field

from pipeline.stage import ModelSpec

# What a score is compared to wherever a judge flags (pipeline/judges.py `reaches`: at or over).
Threshold = Annotated[float, Field(gt=0, le=1)]


class ScorerSpec(ModelSpec):
    kind: Literal["profanity-check", "detoxify"] = "profanity-check"
    model_type: str = "original"  # detoxify: original, unbiased, multilingual, *-small
    checkpoint: str | None = None  # detoxify: local .ckpt file
    huggingface_config_path: str | None = None  # detoxify: local folder with config + tokenizer
    batch_size: int = Field(32, ge=1)  # texts per model call
    # Where the scorer judges rows (filter, inject, rewrite; pipeline/judges.py): its name, which
    # prefixes its labels when several judge one gate (None: its kind), and its own verdict's
    # threshold (None: the stage's) and label (None: the maximum over its labels).
    name: str | None = Field(None, min_length=1)
    threshold: Threshold | None = None
    label: str | None = None


def without_verdict(spec: ScorerSpec) -> ScorerSpec:
    """A validator for a scorer used outside the row gates (decode's guard, eval's scorer judge),
    which read their own threshold and label: a judge's `name`/`threshold`/`label` set there
    would be ignored, so it is an error instead."""
    given = [f for f in ("name", "threshold", "label") if getattr(spec, f) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} only apply where a scorer gates rows (filter, inject, natural, "
            "rewrite); set the threshold and label beside `scorer:` here instead"
        )
    return spec


class Scorer(Protocol):
    spec: ScorerSpec
    labels: tuple[str, ...]

    def score(self, texts: list[str]) -> list[dict[str, float]]: ...


class ProfanityCheckScorer:
    labels = ("profanity",)

    def __init__(self, spec: ScorerSpec) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ImportError(
                "scorer kind 'profanity-check' needs alt-profanity-check; "
                "run `pip install alt-profanity-check`"
            ) from None
        self.spec = spec
        self._predict_prob = predict_prob

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for start in range(0, len(texts), max(1, self.spec.batch_size)):
            probs = self._predict_prob(texts[start : start + self.spec.batch_size])
            out.extend({"profanity": float(p)} for p in probs)
        return out


class DetoxifyScorer:
    def __init__(self, spec: ScorerSpec) -> None:
        try:
            import detoxify.detoxify as dx
        except ImportError:
            raise ImportError(
                "scorer kind 'detoxify' needs detoxify; run `pip install detoxify`"
            ) from None
        self.spec = spec
        how = (
            f"set scorer.checkpoint to a local detoxify .ckpt file (for {spec.model_type!r}: "
            f"{dx.MODEL_URLS.get(spec.model_type, 'see github.com/unitaryai/detoxify releases')}) "
            "and scorer.huggingface_config_path to a folder with its Hugging Face config and "
            "tokenizer, or use scorer.kind: profanity-check"
        )
        if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
            raise FileNotFoundError(f"detoxify checkpoint {spec.checkpoint} does not exist; {how}")
        if spec.checkpoint is None and not _in_torch_hub_cache(dx.MODEL_URLS.get(spec.model_type)):
            raise FileNotFoundError(
                f"detoxify model {spec.model_type!r} is not available offline; {how}"
            )
        try:
            self._model = dx.Detoxify(
                spec.model_type,
                checkpoint=spec.checkpoint,
                huggingface_config_path=spec.huggingface_config_path,
            )
        except OSError as err:  # transformers could not find the config/tokenizer offline
            raise FileNotFoundError(
                f"detoxify could not load its config or tokenizer ({err}); {how}"
            ) from err
        self.labels = tuple(self._model.class_names)

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for start in range(0, len(texts), max(1, self.spec.batch_size)):
            batch = texts[start : start + self.spec.batch_size]
            # A list input always gives per-label lists, except that squeeze() turns a batch of
            # one into a bare float.
            result = self._model.predict(batch)
            for i in range(len(batch)):
                out.append(
                    {k: float(v if isinstance(v, float) else v[i]) for k, v in result.items()}
                )
        return out


def _in_torch_hub_cache(url: str | None) -> bool:
    if url is None:
        return False
    import torch

    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


SCORERS = {"profanity-check": ProfanityCheckScorer, "detoxify": DetoxifyScorer}


def load_scorer(spec: ScorerSpec) -> Scorer:
    """The scorer for `spec`, by kind."""
    return SCORERS[spec.kind](spec)

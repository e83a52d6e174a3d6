"""The model under evaluation: loading it, checking its control tokens, building prompts with an
open assistant turn, and teacher-forced next-token probabilities.

Prompts are tokenised by the trainer's rule (`trainer.encode.Encoder`): the chat template (or
Gemma's turn format) with user content split on special-token strings, so a typed "[RESET]" is
never the control id, and the assistant turn left open after the generation prompt, with no end
of turn, so a prefill is the start of the model's own answer (Qi et al.).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline import models
from pipeline.backends import GeneratorSpec
from pipeline.decode.config import DecodeConfig, changed
from pipeline.decode.controls import model_controls, token_kind
from pipeline.errors import RetraceError
from trainer.encode import Encoder


class ModelError(RetraceError, RuntimeError):
    """A model the eval cannot use as configured; one line saying what to do."""


@dataclass
class EvalModel:
    name: str  # what tables call it
    generator: Any  # a loaded pipeline.backends generator (the decoder runs on it)
    baseline: bool  # evaluated without control tokens: backtracking is 0 by construction

    @cached_property
    def model(self) -> Any:
        """The transformers model, for teacher-forced probabilities; with the vLLM backend the
        weights are loaded a second time, with transformers, on the same device."""
        if hasattr(self.generator, "model"):
            return self.generator.model
        import torch
        from transformers import AutoModelForCausalLM

        spec = self.generator.spec
        path = models.resolve_model_path(spec.model, spec.revision)
        net = AutoModelForCausalLM.from_pretrained(
            path, revision=spec.revision, dtype=torch.bfloat16 if self.device == "cuda" else None
        ).to(self.device)
        return net.eval()

    @property
    def tokenizer(self) -> Any:
        return self.generator.tokenizer

    @property
    def device(self) -> str:
        return getattr(self.generator, "device", "cuda")  # vLLM runs on CUDA only

    @cached_property
    def encoder(self) -> Encoder:
        # The model's own control tokens (its tokenizer's), not the taxonomy's list: a model may
        # carry a subset of the policies, or policies of a corpus from elsewhere.
        return Encoder(self.tokenizer, 1 << 30, model_controls(self.tokenizer))

    @cached_property
    def control_ids(self) -> dict[str, int]:
        """Control-token string -> id; empty for a baseline model."""
        if self.baseline:
            return {}
        return dict(self.encoder.control)

    @cached_property
    def backtrack_ids(self) -> dict[str, int]:
        """The tokens that decide to take text back: every backtrack token, [RESET] and RLBF's
        category tokens ([REPLACE] and [BACKTRACK_BY_<n>] only close the edit they opened)."""
        opens = ("backtrack", "reset", "category")
        return {t: i for t, i in self.control_ids.items() if token_kind(t) in opens}

    def text_ids(self, text: str) -> list[int]:
        return self.encoder.text(text)

    def prompt_ids(self, user: str, prefill: list[int] | None = None) -> list[int]:
        """The chat up to the open assistant turn, then the prefill ids."""
        head, _ = self.encoder.scaffold([{"role": "user", "content": user}])
        return [*head, *(prefill or [])]

    def next_token_probs(self, contexts: list[list[int]], batch_size: int = 8) -> Any:
        """P(next token | context) for each context, a [len(contexts), vocab] float tensor."""
        import torch

        pad = self.tokenizer.pad_token_id or 0
        out = []
        for start in range(0, len(contexts), batch_size):
            batch = contexts[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in batch])
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids, **left_padded(mask, self.device), use_cache=False
                ).logits
            out.append(logits[:, -1].float().softmax(-1).cpu())
        return torch.cat(out)


def left_padded(mask: Any, device: str) -> dict[str, Any]:
    """Attention mask and position ids for a left-padded batch: each row's positions start at 0
    at its first real token, so a padded row scores exactly as it would alone."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"attention_mask": mask.to(device), "position_ids": positions.to(device)}


_CHECKPOINT_DIRS = ("files", "train", "checkpoints")  # where `retrace train` puts checkpoints


def slug(model: str | None, revision: str | None = None, decode: DecodeConfig | None = None) -> str:
    """A folder name for a model and its decoding: `train` for this run's checkpoint, else a
    readable name and a short hash of its identity (a local folder's resolved path, else its id
    and revision), so two models that share a folder name (`a/ctrlE`, `b/k/ctrlE`, every
    `train/files/final`) never share an eval folder, and one model keeps its folder across reruns.
    A decoding other than the default adds `-decode-` and a short hash of the settings that differ
    (`ctrlE-1a2b3c4d-decode-5e6f7a8b`): a keep and a drop eval of one model never share a folder,
    and the default's folder keeps its name."""
    base = _model_slug(model, revision)
    different = changed(decode) if decode is not None else {}
    if not different:
        return base
    text = json.dumps(different, sort_keys=True, separators=(",", ":"))
    return f"{base}-decode-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _model_slug(model: str | None, revision: str | None) -> str:
    if model is None:
        return "train"
    name = identity = models.model_id(model, revision)
    if Path(model).is_dir():
        path = Path(model).resolve()
        identity, name = str(path), path.name
        if name == "final" or name.startswith("step-"):  # a checkpoint: name it by its run
            up = next((p.name for p in path.parents if p.name not in _CHECKPOINT_DIRS), "")
            name = f"{up}-{name}" if up else name
    readable = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    return f"{readable or 'model'}-{digest}"


def check_controls(tokenizer: Any, name: str, baseline: bool) -> bool:
    """True when the model has no control tokens at all (a baseline); an error unless that is
    allowed. A model with some of them (a subset of the policies, or policies of its own) is
    evaluated with the ones it has."""
    if model_controls(tokenizer):
        return False
    if not baseline:
        raise ModelError(
            f"eval: model {name} has no control tokens (no [BACKTRACK], [BACKTRACK-<POLICY>], "
            "[REPLACE], [RESET], [CATEGORY-<POLICY>] or [BACKTRACK_BY_<n>] in its vocabulary); "
            "evaluate a model trained by `retrace train`, or this one as a baseline with "
            "`--baseline` (eval.baseline: true; its backtrack rate is then 0 by construction)"
        )
    return True


def load(spec: GeneratorSpec, name: str, baseline: bool, env: Any) -> EvalModel:
    """The model of `spec` (a checkpoint folder, "embedded" or a Hub id) through the engine's
    generator cache; refused without control tokens unless it is evaluated as a baseline."""
    path = models.resolve_model_path(spec.model, spec.revision)
    from transformers import AutoTokenizer

    # The vocabulary is checked before the weights load: a wrong model fails in a second.
    check_controls(AutoTokenizer.from_pretrained(path, revision=spec.revision), name, baseline)
    generator = env.generator(spec)
    return EvalModel(name, generator, check_controls(generator.tokenizer, name, True))

"""Control tokens at inference: which ids they are, what a config name means, and privileged input.

Prompts are tokenised with the trainer's own rule (`pipeline.tokenizing.TextEncoder`: data text
with special-token splitting, template markup with its special tokens), so a typed "[RESET]" never
becomes the [RESET] id; ids given directly (a prefill in target tokens) are checked instead, and a
control id there is an error naming its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import taxonomy
from pipeline.errors import RetraceError
from pipeline.tokenizing import TextEncoder


class PrivilegedTokenError(RetraceError, ValueError):
    """User-controlled input that holds a control-token id."""


def token_kind(token: str) -> str:
    """What a control token does (`taxonomy.classify`): backtrack, replace, reset, RLBF's category
    and backtrack_by, or control for any other string."""
    c = taxonomy.load().classify(token)
    return "control" if c is None else c.kind


def token_policy(token: str) -> str | None:
    """The policy a backtrack or category token names, if any."""
    c = taxonomy.load().classify(token)
    return None if c is None else c.policy


def model_controls(tokenizer: Any) -> tuple[str, ...]:
    """A model's control tokens: the taxonomy's that its vocabulary holds, then every other token
    it added that has a control token's form (a trainer adds what its corpus uses, which may be
    policies the taxonomy does not name). These, not a fixed list, are what inference reads."""
    tax = taxonomy.load()
    vocab = tokenizer.get_vocab()
    own = [t for t in tax.all_tokens if t in vocab]
    known = set(own)
    added = sorted(t for t in tokenizer.get_added_vocab() if t not in known and tax.classify(t))
    return (*own, *added)


def resolve_name(name: str) -> str:
    """A config name (`RESET`, `BACKTRACK-HATE`, `[RESET]`, or a policy such as `hate`) as its
    control-token string; an unknown name is a KeyError listing the known ones. A name of a
    control token's form the taxonomy lacks (`BACKTRACK-PRIVACY_VIOLATION`) is a model's own:
    it is checked against the model's vocabulary when the decoder loads."""
    tax = taxonomy.load()
    if name in tax.policies:
        return tax.policies[name].token
    token = name if name.startswith("[") else f"[{name}]"
    if token in tax.control_tokens or tax.classify(token) is not None:
        return token
    known = ", ".join([t.strip("[]") for t in tax.control_tokens] + list(tax.policies))
    raise KeyError(f"decode: unknown control token or policy {name!r}; known: {known}")


@dataclass
class Controls:
    """The control tokens of one tokenizer and the logit offsets a DecodeConfig asks for."""

    ids: dict[str, int]  # control-token string -> id, for those in the vocabulary
    offsets: dict[int, float] = field(default_factory=dict)  # id -> added logit (-inf: disabled)

    @property
    def tokens(self) -> dict[int, str]:
        return {i: t for t, i in self.ids.items()}

    @classmethod
    def build(cls, tokenizer: Any, bias: dict[str, float], disable: tuple[str, ...]) -> Controls:
        vocab = tokenizer.get_vocab()
        ids = {t: vocab[t] for t in model_controls(tokenizer)}
        offsets: dict[int, float] = {}
        for key, names in (("bias", list(bias)), ("disable", list(disable))):
            for name in names:
                token = resolve_name(name)
                if token not in ids:
                    raise KeyError(
                        f"decode.{key}.{name}: {token} is not in this model's vocabulary (a model "
                        "not trained with control tokens); remove it for this model"
                    )
                if key == "bias":
                    offsets[ids[token]] = offsets.get(ids[token], 0.0) + float(bias[name])
                else:
                    offsets[ids[token]] = float("-inf")
        return cls(ids, offsets)


class PromptEncoder:
    """Prompt and prefill ids for one tokenizer, by the trainer's rule."""

    def __init__(self, tokenizer: Any, controls: Controls) -> None:
        self._encoder = TextEncoder(tokenizer)
        self.controls = controls

    def text(self, s: str) -> list[int]:
        """Data text as ids: control/special strings in it are split, never their ids."""
        return self._encoder.text(s)

    def prompt(self, messages: list[dict[str, str]], where: str) -> list[int]:
        """The conversation up to the open assistant turn."""
        head, _ = self._encoder.scaffold(messages)
        self.check(head, where)
        return head

    def check(self, ids: list[int], where: str) -> None:
        tokens = self.controls.tokens
        for pos, t in enumerate(ids):
            if t in tokens:
                raise PrivilegedTokenError(
                    f"{where}: control token {tokens[t]} (id {t}) at token {pos}; control tokens "
                    "are privileged: pass user text as text, never as control ids"
                )

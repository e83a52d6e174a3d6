"""Control tokens at inference: which ids they are, what a config name means, and privileged input.

Prompts are tokenised with the trainer's own rule (`trainer.encode.Encoder`: data text with
special-token splitting, template markup with its special tokens), so a typed "[RESET]" never
becomes the [RESET] id; ids given directly (a prefill in target tokens) are checked instead, and a
control id there is an error naming its position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import taxonomy
from pipeline.errors import RetraceError
from trainer.encode import Encoder


class PrivilegedTokenError(RetraceError, ValueError):
    """User-controlled input that holds a control-token id."""


def token_kind(token: str) -> str:
    """What a control token does, by the taxonomy: backtrack, replace, reset, RLBF's category and
    backtrack_by, or control."""
    tax = taxonomy.load()
    if token == tax.reset_token:
        return "reset"
    if token == tax.replace_token:
        return "replace"
    if token in tax.category_tokens:
        return "category"
    if tax.backtrack_by_count(token) is not None:
        return "backtrack_by"
    if token == tax.generic_token or token in _policy_of_token():
        return "backtrack"
    return "control"


def _policy_of_token() -> dict[str, str]:
    """Each policy's BSAFE backtrack token and its RLBF category token -> the policy."""
    tax = taxonomy.load()
    return {t: name for name, p in tax.policies.items() for t in (p.token, tax.category(name))}


def token_policy(token: str) -> str | None:
    """The policy a control token names, if any."""
    return _policy_of_token().get(token)


def resolve_name(name: str) -> str:
    """A config name (`RESET`, `BACKTRACK-HATE`, `[RESET]`, or a policy such as `hate`) as its
    control-token string; an unknown name is a KeyError listing the known ones."""
    tax = taxonomy.load()
    if name in tax.policies:
        return tax.policies[name].token
    token = name if name.startswith("[") else f"[{name}]"
    if token in tax.control_tokens:
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
        ids = {t: vocab[t] for t in taxonomy.load().all_tokens if t in vocab}
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
        self._encoder = Encoder(tokenizer, max_length=1 << 30, control_tokens=tuple(controls.ids))
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

"""The policy taxonomy and the control-token strings (prompts/policies.yaml).

Control tokens are privileged (docs/data-contract.md#control-tokens): any control-token string or
model special token found in source text is neutralised here, before it enters a record, so no row
can spell one by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
TAXONOMY_FILE = PROMPTS_DIR / "policies.yaml"


@dataclass(frozen=True)
class Policy:
    name: str
    token: str
    description: str
    beavertails: tuple[str, ...]


@dataclass(frozen=True)
class Control:
    """What a control token does: `kind` backtrack | replace | reset | category | backtrack_by."""

    kind: str
    policy: str | None = None  # the policy a backtrack or category token names (None: generic)
    n: int | None = None  # backtrack_by: how many tokens it takes back


# The control-token forms a model may carry beyond the taxonomy (a corpus from elsewhere names its
# own policies, and the trainer adds whatever control tokens a corpus uses): read by form.
_FORM = re.compile(
    r"\[(?:BACKTRACK(?:-(?P<policy>[A-Z0-9][A-Z0-9_\-]*))?|(?P<replace>REPLACE)|(?P<reset>RESET)"
    r"|CATEGORY-(?P<category>[A-Z0-9][A-Z0-9_\-]*)|BACKTRACK_BY_(?P<n>[1-9][0-9]*))\]"
)


def _policy_name(tag: str) -> str:
    return tag.lower().replace("-", "_")


@dataclass(frozen=True)
class Taxonomy:
    generic_token: str
    replace_token: str
    reset_token: str
    policies: dict[str, Policy]
    # RLBF (Sel et al. 2026): a category token per policy, then "take back the last n tokens",
    # one privileged token per n = 1..backtrack_by_max (docs/formats.md#rlbf: spelling decided
    # here).
    category_token: str = "[CATEGORY-{tag}]"
    backtrack_by_token: str = "[BACKTRACK_BY_{n}]"
    backtrack_by_max: int = 128

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """BSAFE's and reset's control tokens, generic first: what the trainer always adds."""
        per_policy = tuple(p.token for p in self.policies.values())
        return (self.generic_token, *per_policy, self.replace_token, self.reset_token)

    @property
    def rlbf_tokens(self) -> tuple[str, ...]:
        """RLBF's category and take-back tokens. The trainer adds them when its corpus uses them
        (as any corpus control token), so a model not trained on rlbf keeps its vocabulary."""
        return (*self.category_tokens, *self.backtrack_by_tokens)

    @property
    def all_tokens(self) -> tuple[str, ...]:
        """Every control-token string of every format: what the renderer and records know."""
        return (*self.control_tokens, *self.rlbf_tokens)

    @property
    def category_tokens(self) -> tuple[str, ...]:
        """RLBF's category tokens, one per policy, in taxonomy order."""
        return tuple(self.category(name) for name in self.policies)

    @property
    def backtrack_by_tokens(self) -> tuple[str, ...]:
        """RLBF's take-back tokens for n = 1..backtrack_by_max."""
        return tuple(self.backtrack_by(n) for n in range(1, self.backtrack_by_max + 1))

    def category(self, policy: str) -> str:
        """RLBF's category token: the policy name in capitals with dashes (`[CATEGORY-HATE]`)."""
        self.backtrack_token(policy)  # the same error for an unknown policy
        return self.category_token.format(tag=policy.upper().replace("_", "-"))

    def backtrack_by(self, n: int) -> str:
        if not 1 <= n <= self.backtrack_by_max:
            raise ValueError(
                f"backtrack-by count {n} is outside 1..{self.backtrack_by_max} "
                f"(backtrack_by_max in {TAXONOMY_FILE.name})"
            )
        return self.backtrack_by_token.format(n=n)

    def backtrack_by_count(self, token: str) -> int | None:
        """n for a `[BACKTRACK_BY_<n>]` token, None for any other string."""
        head, _, tail = self.backtrack_by_token.partition("{n}")
        if not (token.startswith(head) and token.endswith(tail)):
            return None
        digits = token[len(head) : len(token) - len(tail)]
        if not digits.isdigit() or str(int(digits)) != digits:
            return None
        return int(digits) if 1 <= int(digits) <= self.backtrack_by_max else None

    def classify(self, token: str) -> Control | None:
        """What `token` does: the taxonomy's own tokens by their role, any other string by its
        form (`[BACKTRACK]`, `[BACKTRACK-<X>]`, `[REPLACE]`, `[RESET]`, `[CATEGORY-<X>]`,
        `[BACKTRACK_BY_<n>]`); None for a string that is no control token."""
        if token == self.generic_token:
            return Control("backtrack")
        if token == self.replace_token:
            return Control("replace")
        if token == self.reset_token:
            return Control("reset")
        for name, p in self.policies.items():
            if token == p.token:
                return Control("backtrack", name)
            if token == self.category(name):
                return Control("category", name)
        n = self.backtrack_by_count(token)
        if n is not None:
            return Control("backtrack_by", n=n)
        m = _FORM.fullmatch(token)
        if m is None:
            return None
        if m["replace"] or m["reset"]:
            return Control("replace" if m["replace"] else "reset")
        if m["category"]:
            return Control("category", _policy_name(m["category"]))
        if m["n"]:
            return Control("backtrack_by", n=int(m["n"]))
        return Control("backtrack", _policy_name(m["policy"]) if m["policy"] else None)

    def backtrack_token(self, policy: str, per_policy: bool = True) -> str:
        if not per_policy:
            return self.generic_token
        try:
            return self.policies[policy].token
        except KeyError:
            known = ", ".join(self.policies)
            raise KeyError(
                f"policy {policy!r} is not in {TAXONOMY_FILE.name}; known: {known}"
            ) from None

    def from_beavertails(self, categories: dict[str, bool]) -> list[str]:
        """Our policies for a BeaverTails row's category booleans, in taxonomy order."""
        hit = {c for c, on in categories.items() if on}
        return [name for name, p in self.policies.items() if hit.intersection(p.beavertails)]


@cache
def load(path: Path = TAXONOMY_FILE) -> Taxonomy:
    raw = yaml.safe_load(Path(path).read_text())
    policies = {
        name: Policy(name, p["token"], p.get("description", ""), tuple(p.get("beavertails", ())))
        for name, p in raw["policies"].items()
    }
    rlbf = {
        k: raw[k] for k in ("category_token", "backtrack_by_token", "backtrack_by_max") if k in raw
    }
    return Taxonomy(
        raw["generic_token"], raw["replace_token"], raw["reset_token"], policies, **rlbf
    )


# Bracketed control-token look-alikes ([RESET], [backtrack-hate], [ REPLACE ], [backtrack_by_7],
# [CATEGORY-HATE]), Gemma 3's bracketed `[multimodal]` token, and the Gemma turn and special
# tokens. Case and inner spaces vary so near-misses are caught too.
_CONTROL = re.compile(
    r"\[\s*(BACKTRACK(?:\s*[-_]\s*[A-Z0-9_\-]+)?|CATEGORY\s*[-_]\s*[A-Z0-9_\-]+"
    r"|REPLACE|RESET|multimodal)\s*\]",
    re.IGNORECASE,
)
_SPECIAL = re.compile(
    r"<(/?(?:start_of_turn|end_of_turn|bos|eos|pad|unk|mask|start_of_image|end_of_image"
    r"|image_soft_token|unused\d+))>"
)


def neutralise(text: str) -> tuple[str, int]:
    """`text` with control/special token strings defused, and how many were found.

    `[RESET]` becomes `(RESET)`, `[multimodal]` `(multimodal)` and `<end_of_turn>`
    `‹end_of_turn›`: still readable, never the token.
    """
    text, n_control = _CONTROL.subn(lambda m: f"({m.group(1)})", text)
    text, n_special = _SPECIAL.subn(lambda m: f"‹{m.group(1)}›", text)
    return text, n_control + n_special

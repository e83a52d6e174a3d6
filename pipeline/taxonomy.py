"""The policy taxonomy and the control-token strings (prompts/policies.yaml).

Control tokens are privileged (DESIGN §4): any control-token string or model special token found
in source text is neutralised here, before it enters a record, so no row can spell one by accident.
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
class Taxonomy:
    generic_token: str
    replace_token: str
    reset_token: str
    policies: dict[str, Policy]

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """Every control-token string, generic first: what the trainer adds to the vocabulary."""
        per_policy = tuple(p.token for p in self.policies.values())
        return (self.generic_token, *per_policy, self.replace_token, self.reset_token)

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
    return Taxonomy(raw["generic_token"], raw["replace_token"], raw["reset_token"], policies)


# Bracketed control-token look-alikes ([RESET], [backtrack-hate], [ REPLACE ]), Gemma 3's bracketed
# `[multimodal]` token, and the Gemma turn and special tokens. Case and inner spaces vary so
# near-misses are caught too.
_CONTROL = re.compile(
    r"\[\s*(BACKTRACK(?:\s*-\s*[A-Z_\-]+)?|REPLACE|RESET|multimodal)\s*\]", re.IGNORECASE
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

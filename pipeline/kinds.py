"""The kinds of published row, in one table.

Each row says what a kind is built from (the stage table its rows come from, per mixture
component), which control tokens it carries (named by what they do, spelled by the taxonomy),
whether it is SFT or preference, whether `mixture` may mix it, whether it gets a `-tok` twin, and
its line in the data card's Configs table. Blend (inputs, components, mixture, outputs), format's
tables, publish (configs, card, `-tok` twins), the trainer's `per_step` components, the decoder's
test and `retrace show` all iterate KINDS; records.CONFIGS is its names plus `mixture`. A new
kind is one row here plus its builder (the stage function that writes its table).

Part of the contract: imports only taxonomy.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import taxonomy


@dataclass(frozen=True)
class Kind:
    name: str
    # The stage whose function builds its rows, as its table `<builder>.<name>` (`table`).
    builder: str
    # What its control tokens do (taxonomy.Control.kind); `control_tokens` spells them.
    controls: tuple[str, ...]
    preference: bool  # DPO pairs (prompt, chosen, rejected); else SFT rows
    mixable: bool  # blend may mix it into `mixture` (one SFT table: SFT kinds only)
    # Its rows say where their harmful span came from (meta.origin); the card counts them.
    origin: bool
    card: str  # the data card's "what a row is"
    loss: str  # the data card's "loss on"
    # For a kind blend builds itself (utility): the (mixture component, stage table) pairs it
    # builds it from (stages/blend_rows.py), each component weighed on its own in blend.ratios
    # and train.per_step. Empty: blend reads the builder's table as one component.
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mixable and self.preference:
            raise ValueError(f"kind {self.name}: preference pairs cannot be mixed into `mixture`")

    @property
    def table(self) -> str:
        return f"{self.builder}.{self.name}"

    @property
    def built_from(self) -> tuple[tuple[str, str], ...]:
        """Blend's (mixture component, input table) pairs for this kind."""
        return self.sources or ((self.name, self.table),)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.built_from)

    @property
    def tokenized(self) -> bool:
        """Does publish give it a `<kind>-tok` twin? Every SFT kind: the twin is the trainer's
        encoding of its segments, which preference pairs do not have."""
        return not self.preference

    def control_tokens(self, tax: taxonomy.Taxonomy | None = None) -> tuple[str, ...]:
        """Its control-token strings, in the taxonomy's order."""
        tax = tax or taxonomy.load()
        return tuple(t for t in tax.all_tokens if tax.classify(t).kind in self.controls)


# In the order of blend's inputs (format's tables, then the kind blend builds itself): blend's
# exact dedup keeps the earliest row, and its report (and so the card) lists components so.
KINDS: tuple[Kind, ...] = (
    Kind(
        name="bsafe",
        builder="format",
        controls=("backtrack", "replace"),
        preference=False,
        mixable=True,
        origin=True,
        card=(
            "Sel et al. 2025 (BSAFE): benign text · harmful span · `[BACKTRACK-<POLICY>]` · the "
            "span repeated · `[REPLACE]` · a safe alternative · the rest"
        ),
        loss="everything but the harmful span",
    ),
    Kind(
        name="rlbf",
        builder="format",
        controls=("category", "backtrack_by"),
        preference=False,
        mixable=True,
        origin=True,
        card=(
            "Sel et al. 2026 (RLBF), from the same violations as `bsafe`: benign text · harmful "
            "span · `[CATEGORY-<POLICY>]` · `[BACKTRACK_BY_<n>]` · the benign text's safe "
            "continuation; n = the span's tokens in the target tokenizer"
        ),
        loss="the control tokens and the continuation (not the text before the span, as in the "
        "paper)",
    ),
    Kind(
        name="reset",
        builder="format",
        controls=("reset",),
        preference=False,
        mixable=True,
        origin=False,
        card=(
            "Zhang et al. 2024: a prefix of an unsafe response · `[RESET]` · a safe response "
            "(and plain safe responses)"
        ),
        loss="`[RESET]`, the safe response, end of turn",
    ),
    Kind(
        name="recovery",
        builder="format",
        controls=(),
        preference=False,
        mixable=True,
        origin=False,
        card=(
            "Qi et al. 2024: the first k tokens of a harmful answer · a refusal, no special token"
        ),
        loss="the refusal, end of turn",
    ),
    Kind(
        name="preference",
        builder="format",
        controls=("reset",),
        preference=True,
        mixable=False,
        origin=False,
        card="Zhang et al.'s DPO pairs: prompt, chosen, rejected",
        loss="(DPO)",
    ),
    Kind(
        name="utility",
        builder="blend",
        controls=(),
        preference=False,
        mixable=True,
        origin=False,
        card=(
            "Alpaca, GSM8K (with its `#### N` line), MATH (with `\\boxed{}`), and Qi et al.'s "
            "anchor: benign prompts answered by the generator"
        ),
        loss="the answer",
        sources=(("utility", "sources.utility"), ("anchor", "filter.responses")),
    ),
)

BY_NAME = {k.name: k for k in KINDS}
SFT_KINDS = tuple(k.name for k in KINDS if not k.preference)
# The published configs' order (card, `load_dataset` names): the SFT kinds, then the pairs.
NAMES = (*SFT_KINDS, *(k.name for k in KINDS if k.preference))
# Mixture components in table order, the kind each is published as, and those `mixture` may mix.
COMPONENTS = tuple(c for k in KINDS for c in k.components)
KIND_OF = {c: k.name for k in KINDS for c in k.components}
MIXED = tuple(c for k in KINDS if k.mixable for c in k.components)
# What `train.per_step` may name: every SFT component (the trainer reads any SFT config).
SFT_COMPONENTS = tuple(c for k in KINDS if not k.preference for c in k.components)


def built_by(stage: str) -> tuple[str, ...]:
    """The kinds whose rows `stage` writes as a table of its own (`<stage>.<kind>`)."""
    return tuple(k.name for k in KINDS if k.builder == stage)


def is_preference(config: str) -> bool:
    """Is published config `config` a preference kind (every other config holds SFT rows)?"""
    kind = BY_NAME.get(config)
    return kind is not None and kind.preference

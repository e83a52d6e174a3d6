"""What the corpus hands the trainer, as a typed file beside the shards: `retrace.json`.

publish writes it at the dataset folder's root from `Handoff`, and the trainer reads it back with
the same model, strictly: an unknown or a missing key is one line naming the file and the key. It
replaces reading values back out of the card's prose (the card's embedded config stays, for
`retrace run --from-card` and for people). It holds:

- `recovery`: the format stage's k draw (`p_zero`, `k_cap`, `refusal_separator`, format's own
  key names), so the trainer's per-epoch redraw is the draw the rows were published with;
- `tokenizer`: the id of the target tokenizer format counted recovery's k and rlbf's n in (as
  the rows' `meta.tokenizer` names it), or null when no row counts tokens;
- `control_tokens`: per published config with `segments`, the control-token strings its rows
  use (both splits), sorted: the tokens a model trained on the config must add.

`datasets.load_dataset(folder, config)` does not read it: the card's `configs` header points each
config at `data/<config>/*.parquet`. Contract module: imports nothing else of the project but
the contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import recovery

FILE = "retrace.json"


class HandoffError(ValueError):
    """retrace.json is missing or does not fit `Handoff`; the message names the file and key."""


class Recovery(BaseModel):
    """The recovery draw's settings (pipeline/recovery.py draws with them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    p_zero: float = Field(ge=0, le=1)
    k_cap: int = Field(ge=1)
    refusal_separator: str


# The draw with pipeline/recovery.py's defaults, for rows no format stage drew.
DEFAULT_RECOVERY = Recovery(
    p_zero=recovery.P_ZERO, k_cap=recovery.K_CAP, refusal_separator=recovery.SEPARATOR
)


class Handoff(BaseModel):
    """The contents of retrace.json; every key required, none unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    recovery: Recovery
    tokenizer: str | None
    control_tokens: dict[str, list[str]]


def control_tokens(table: pa.Table) -> list[str]:
    """Every control-token string a table's `segments` use, sorted."""
    segments = pc.list_flatten(table.column("segments"))
    control = pc.equal(pc.struct_field(segments, "role"), "control")
    found = pc.unique(pc.filter(pc.struct_field(segments, "text"), control)).to_pylist()
    return sorted(t for t in found if t is not None)


def write(folder: Path, handoff: Handoff) -> Path:
    """`handoff` as `<folder>/retrace.json`: sorted keys, so the same corpus gives the same
    bytes."""
    path = Path(folder) / FILE
    text = json.dumps(handoff.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read(folder: Path) -> Handoff:
    """`<folder>/retrace.json`, validated by `Handoff`."""
    path = Path(folder) / FILE
    redo = "republish the folder with `retrace stage publish`"
    if not path.is_file():
        raise HandoffError(
            f"{path} is missing: the folder was published by an older retrace, or not by "
            f"retrace; {redo} (pipeline/handoff.py says what the file holds)"
        )
    try:
        return Handoff.model_validate_json(path.read_bytes())
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
            for e in err.errors()
        )
        raise HandoffError(f"{path}: {problems}; {redo}") from None

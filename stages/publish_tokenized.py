"""publish's tokenized twins: every SFT config as `<config>-tok`, token ids and a loss mask built
by the bundled trainer's own encoder (trainer/encode.py), so TRL trains exactly what `retrace
train` trains.

TRL's SFTTrainer takes a pre-tokenized dataset (`input_ids`) and, with
`completion_only_loss=True`, builds labels from `completion_mask`: label i is input_ids[i] where
the mask is 1, else -100, and the model shifts once. So completion_mask[i] is the encoder's
trained[i] ("token i is a training target"): 0 on the prompt, harmful spans, unsafe prefixes and
h≤k, 1 on the trained segments and the end of turn, non-contiguous where a row needs it. The
chat template is applied and control tokens are the special tokens the trainer adds; the folder
carries that tokenizer so the ids can be reproduced, every control token at the id the trainer
gives it (trainer/tokens.py `control_tokens`: one order). Recovery rows keep their published k
(the bundled trainer redraws k every epoch; a fixed table cannot); rlbf rows have their
`[BACKTRACK_BY_<n>]` counted in the tokenizer published, by the decoder's rule, as the trainer
counts it (trainer/rlbf.py).

A row the encoder refuses (no trained token, say) is left out with the encoder's reason, as
the bundled trainer drops it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import records

SUFFIX = "tok"


def names(tokenizers: list[str]) -> list[tuple[str, str]]:
    """(config suffix, tokenizer folder) per tokenizer: `-tok` and `tokenizer/` for one; with
    several, each is told apart by its id (`-tok-gemma-3-270m`, `tokenizer-gemma-3-270m/`)."""
    if len(tokenizers) == 1:
        return [(SUFFIX, "tokenizer")]
    slugs = [re.sub(r"[^a-z0-9]+", "-", Path(t).name.lower()).strip("-") for t in tokenizers]
    if len(set(slugs)) < len(slugs):
        raise ValueError(f"publish.tokenized: two tokenizers share a name: {tokenizers}")
    return [(f"{SUFFIX}-{s}", f"tokenizer-{s}") for s in slugs]


def encoder(source: str) -> Any:
    """The trainer's Encoder over `source`'s tokenizer with the control tokens added."""
    from pipeline import taxonomy
    from trainer import tokens
    from trainer.encode import Encoder

    # RLBF's tokens too, in the trainer's order: the ids a model trained on an rlbf corpus has.
    rlbf = taxonomy.load().rlbf_tokens
    tok = tokens.load_tokenizer(source)
    tokens.add_control_tokens(tok, rlbf)
    # No truncation: the export holds whole rows; TRL truncates to its own max_length.
    return Encoder(tok, sys.maxsize, tokens.control_tokens(rlbf))


def encode(table: pa.Table, config: str, enc: Any) -> tuple[pa.Table, list[dict[str, Any]]]:
    """`table`'s rows as records.TOKENIZED rows (its split column kept), and the rows the encoder
    refused as publish rejections."""
    out, rejected = [], []
    for row in table.to_pylist():
        doc = enc.encode(row, config)
        if isinstance(doc, str):
            rejected.append(records.reject(row, "publish", doc, f"{config}-{SUFFIX}"))
            continue
        out.append(
            {
                "id": row["id"],
                "kind": row["kind"],
                "input_ids": doc.ids,
                "completion_mask": [int(t) for t in doc.trained],
                "split": row["split"],
            }
        )
    return records.table(out, records.with_split(records.TOKENIZED)), rejected


def save_tokenizer(enc: Any, folder: Path) -> None:
    enc.tok.save_pretrained(folder)

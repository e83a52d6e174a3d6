"""Documents -> micro-batches: length-bucketed padding or packing, then tensors.

Packing fills rows of `max_length` tokens first-fit-decreasing, so few pad tokens remain. Each
packed document keeps its own positions (0, 1, ...) and its last token has no label, so no
document is ever predicted from the one before it. With no attention mask and reset positions,
transformers builds a block-diagonal causal mask (sdpa/eager) or varlen calls (flash attention),
so documents do not see each other either: a packed batch gives the same loss as the unpacked one
(docs/formats.md#trainer-facts; tested). Bucketing sorts a buffer of rows by length and pads each
micro-batch to its longest row, with a 2D attention mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch

from trainer.encode import Doc

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L]: the next token where it is trained, else -100 (shifted once)
    position_ids: torch.Tensor  # [B, L]: restart at 0 for every document
    trained_index: torch.Tensor  # [B, L]: 1-based index of a trained target in its document
    weights: torch.Tensor  # [B, L]: loss weight of each target (decision points), 0 where none
    attention_mask: torch.Tensor | None  # [B, L] when padded; None when packed
    n_tokens: int  # real (non-pad) tokens
    n_trained: int

    def to(self, device: torch.device) -> Batch:
        moved = {
            f.name: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)


def plan(
    docs: list[Doc], batch_size: int, max_length: int, pack: bool, rng: random.Random | None
) -> list[list[list[Doc]]]:
    """Micro-batches of rows of documents; the micro-batch order is shuffled when `rng` is given."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i].ids))  # stable: ties keep order
    if pack:
        rows: list[list[Doc]] = []
        room: list[int] = []
        for i in order:
            n = len(docs[i].ids)
            j = next((j for j, r in enumerate(room) if r >= n), None)
            if j is None:
                rows.append([])
                room.append(max_length)
                j = len(rows) - 1
            rows[j].append(docs[i])
            room[j] -= n
    else:
        rows = [[docs[i]] for i in order]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(rows: list[list[Doc]], pad_id: int, width: int | None = None) -> Batch:
    """Tensors for one micro-batch, padded to its longest row or to `width` (static shapes for
    torch.compile)."""
    packed = any(len(r) > 1 for r in rows)
    width = max(width or 0, *(sum(len(d.ids) for d in r) for r in rows))
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    trained_index = torch.zeros(shape, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    mask = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(rows):
        o = 0
        for d in row:
            n = len(d.ids)
            ids = torch.tensor(d.ids)
            flags = torch.tensor(d.trained[1:], dtype=torch.bool)
            input_ids[b, o : o + n] = ids
            targets[b, o : o + n - 1] = torch.where(flags, ids[1:], IGNORE)
            trained_index[b, o : o + n - 1] = torch.cumsum(flags, 0) * flags
            w = torch.tensor(d.weights[1:], dtype=torch.float32) if d.weights else 1.0
            weights[b, o : o + n - 1] = torch.where(flags, w, 0.0)
            position_ids[b, o : o + n] = torch.arange(n)
            mask[b, o : o + n] = 1
            o += n
        # The pad tail is its own "document" (positions from 0), so it never joins the last one.
        position_ids[b, o:] = torch.arange(width - o)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        trained_index=trained_index,
        weights=weights,
        attention_mask=None if packed else mask,
        n_tokens=int(mask.sum()),
        n_trained=int((targets != IGNORE).sum()),
    )

"""The KV-cache rows engine (`Rows`: join, leave, crop) and continuous batching for the
transformers backend (`run`): a row leaves the running batch the step it finishes, and the next
waiting request takes its slot. The transformers decoder (pipeline/decode/runner.py) runs its
rows on `Rows` too, cropping a row's cache after a take-back or rollback.

Why not `model.generate`: a padded generate batch runs until its longest row stops while finished
rows keep their slots; on the embedded model at batch 8 and 16, 60-65% of the row-steps it computed
produced no kept token (issue 16). transformers' own continuous-batching API measured no faster than
padded generate on a 2-core CPU (docs/formats.md#generation-facts), so this loop keeps its own KV
cache.

Layout: one `DynamicCache` whose layers hold `[rows, kv heads, width, head dim]`. Each row's
tokens are right-aligned and the columns to their left are masked padding, so every decode step
feeds one token per row, as generate does after its prefill. Requests join sorted by prompt. Each
is prefilled alone (no padding; the start it shares with the previous prompt is reused, and
samples of one prompt share its prefill), and its keys and values are padded on the left into the
batch; when rows leave, columns no remaining row uses are cut.

Rows never see each other: a row's logits depend only on its own tokens (up to float rounding of
batched kernels), and `pick` gets the request index of every row so it can draw each row from
that request's own random stream.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class Stats:
    """What a run computed, to compare with padded generate (scripts/bench_generate.py)."""

    calls: int = 0
    requests: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the model
    steps: int = 0  # decode forward passes
    # Tokens the model was asked to produce: one per request from its prefill, plus one per row
    # per decode step. Here every one is kept; padded generate also computes finished rows.
    row_steps: int = 0
    tokens: int = 0  # generated tokens kept

    def add(self, other: Stats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# pick(logits [rows, vocab], request index of each row) -> one token id per row
Pick = Callable[[Any, list[int]], list[int]]
# done(request index, its tokens so far) -> whether the request is finished
Done = Callable[[int, list[int]], bool]


def run(
    model: Any,
    prompts: list[list[int]],
    requests: list[int],
    batch_size: int,
    pick: Pick,
    done: Done,
) -> tuple[list[list[int]], Stats]:
    """Generated token ids for each request (`requests[r]` is its prompt's index), in order.

    Requests join the batch `batch_size` at most at a time, sorted by prompt, so prompts that
    start alike (a stage's template) follow each other and share their prefill."""
    stats = Stats(calls=1, requests=len(requests))
    out: list[list[int]] = [[] for _ in requests]
    queue = deque(sorted(range(len(requests)), key=lambda r: (prompts[requests[r]], r)))
    waiting = Counter(requests)  # requests per prompt not yet started, to free shared prefills
    prefills: dict[int, tuple[list[tuple[Any, Any]], Any]] = {}
    previous: tuple[list[int], list[tuple[Any, Any]]] | None = None
    batch = Rows(model)
    with torch.inference_mode():
        while queue or batch.rows:
            joining = []
            while queue and len(batch.rows) + len(joining) < max(1, batch_size):
                r = queue.popleft()
                p = requests[r]
                if p not in prefills:
                    kv, logits, computed = prefill(model, prompts[p], previous)
                    prefills[p], previous = (kv, logits), (prompts[p], kv)
                    stats.prefill_tokens += computed
                kv, logits = prefills[p]
                waiting[p] -= 1
                if not waiting[p]:
                    del prefills[p]
                out[r].append(pick(logits, [r])[0])
                stats.row_steps += 1
                if not done(r, out[r]):
                    joining.append((r, kv, len(prompts[p])))
            batch.add(joining)
            if not batch.rows:
                continue
            rows = list(batch.rows)
            tokens = pick(batch.step([out[r][-1] for r in rows]), rows)
            stats.steps += 1
            stats.row_steps += len(rows)
            finished = []
            for k, (r, token) in enumerate(zip(rows, tokens, strict=True)):
                out[r].append(token)
                if done(r, out[r]):
                    finished.append(k)
            batch.drop(finished)
    stats.tokens = sum(map(len, out))
    return out, stats


def prefill(
    model: Any, ids: list[int], previous: tuple[list[int], list[tuple[Any, Any]]] | None
) -> tuple[list[tuple[Any, Any]], Any, int]:
    """One prompt alone through the model: its keys and values per layer, the logits of its last
    position ([1, vocab]) and how many tokens were run.

    The tokens it shares with the start of the previous prompt reuse that prompt's keys and values
    (with causal attention they depend only on the tokens before them): the sample stage's
    prompts share their few-shot turns, ~350 of ~360 tokens on the embedded model, and a
    prefill there costs as much as ~5 decode steps at batch 8."""
    shared = 0
    if previous is not None:
        limit = min(len(previous[0]), len(ids) - 1)  # run at least one token, for its logits
        while shared < limit and previous[0][shared] == ids[shared]:
            shared += 1
    if shared < _MIN_SHARED:
        shared = 0
    # Full layers only: sliding-window layers are handled by the attention mask.
    cache = DynamicCache(
        ddp_cache_data=[(k[:, :, :shared], v[:, :, :shared]) for k, v in previous[1]]
        if shared
        else None
    )
    out = model(
        input_ids=torch.tensor([ids[shared:]], device=model.device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, out.logits[:, -1], len(ids) - shared


# Fewer shared tokens than this are recomputed: copying them saves less than it costs.
_MIN_SHARED = 16


class Rows:
    """The running rows over one KV cache and attention mask: rows join (`add`), leave (`drop`)
    and shrink (`crop`, the decoder's take-backs). Used by `run` (generation) and by the
    transformers decoder (pipeline/decode/runner.py)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rows: list[Any] = []  # the caller's item per row (generation: a request index)
        self.positions: list[int] = []  # position id of the token each row feeds next
        self.cache: Any = None
        self.mask: Any = None  # [rows, width], 1 where the column holds a token of that row

    def add(self, joining: list[tuple[int, list[tuple[Any, Any]], int]]) -> None:
        """Append rows: (request, its prompt's keys and values, its prompt length, which is the
        position of the first generated token it feeds)."""
        if not joining:
            return
        current = 0 if self.mask is None else self.mask.shape[1]
        width = max(current, *(kv[0][0].shape[-2] for _, kv, _ in joining))
        device = self.model.device

        def left_pad(x: Any, pad: int) -> Any:
            return torch.nn.functional.pad(x, (0, 0, pad, 0)) if pad else x

        layers = []
        for i in range(len(joining[0][1])):
            keys = [left_pad(kv[i][0], width - kv[i][0].shape[-2]) for _, kv, _ in joining]
            values = [left_pad(kv[i][1], width - kv[i][1].shape[-2]) for _, kv, _ in joining]
            if self.cache is not None:
                layer = self.cache.layers[i]
                keys.insert(0, left_pad(layer.keys, width - current))
                values.insert(0, left_pad(layer.values, width - current))
            layers.append(_Columns(torch.cat(keys), torch.cat(values)))
        masks = (
            [] if self.mask is None else [torch.nn.functional.pad(self.mask, (width - current, 0))]
        )
        for _, kv, _ in joining:
            length = kv[0][0].shape[-2]
            masks.append(torch.tensor([[0] * (width - length) + [1] * length], device=device))
        self.cache = DynamicCache()
        self.cache.layers = layers
        self.mask = torch.cat(masks)
        self.rows += [r for r, _, _ in joining]
        self.positions += [position for _, _, position in joining]

    def step(self, last_tokens: list[int]) -> Any:
        """Feed each row its last token; the next-token logits [rows, vocab]."""
        device = self.model.device
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        out = self.model(
            input_ids=torch.tensor(last_tokens, device=device)[:, None],
            attention_mask=self.mask,
            position_ids=torch.tensor(self.positions, device=device)[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:, -1]

    def drop(self, indices: list[int]) -> None:
        """Remove the rows at `indices`, then the columns no remaining row uses."""
        if not indices:
            return
        gone = set(indices)
        keep = [k for k in range(len(self.rows)) if k not in gone]
        self.rows = [self.rows[k] for k in keep]
        self.positions = [self.positions[k] for k in keep]
        if not keep:
            self.cache = self.mask = None
            return
        self._select(torch.tensor(keep, device=self.mask.device))

    def crop(self, drops: list[int]) -> None:
        """Drop the last `drops[k]` tokens of row k: its keys and values move right by that many
        columns (its left padding grows, masked), so every row still ends at the last column.
        Every layer is full (sliding windows are applied by the mask), so any crop is exact."""
        for k, d in enumerate(drops):
            if not d:
                continue
            for layer in self.cache.layers:
                layer.shift(k, d)
            self.mask[k] = torch.roll(self.mask[k], d)
            self.mask[k, :d] = 0
            self.positions[k] -= d
        if any(drops):
            self._select(torch.arange(len(self.rows), device=self.mask.device))

    def _select(self, index: Any) -> None:
        """Keep the rows at `index`, then cut the columns no remaining row uses."""
        self.mask = self.mask[index]
        first = int(self.mask.any(0).int().argmax())  # the first column any row still uses
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.select(index, first)


class _Columns(DynamicLayer):
    """A cache layer whose keys and values sit in buffers with spare columns, so a decode step
    writes one column: DynamicLayer.update concatenates, copying the whole cache every step (~20%
    of a batch-8 step on the embedded model, measured with torch.profiler)."""

    SPARE = 64  # columns added at a time

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.width = keys.shape[-2]
        self.buffers = [self._grown(keys), self._grown(values)]
        self._views()

    def _grown(self, x: torch.Tensor) -> torch.Tensor:
        rows, heads, width, dim = x.shape
        out = x.new_empty(rows, heads, width + self.SPARE, dim)
        out[:, :, :width] = x
        return out

    def _views(self) -> None:
        self.keys = self.buffers[0][:, :, : self.width]
        self.values = self.buffers[1][:, :, : self.width]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ):
        added = key_states.shape[-2]
        if self.width + added > self.buffers[0].shape[-2]:
            self.buffers = [self._grown(self.keys), self._grown(self.values)]
        self.buffers[0][:, :, self.width : self.width + added] = key_states
        self.buffers[1][:, :, self.width : self.width + added] = value_states
        self.width += added
        self._views()
        return self.keys, self.values

    def shift(self, row: int, d: int) -> None:
        """Move one row's keys and values `d` columns right (its last d wrap to the left, where
        the mask hides them)."""
        for x in (self.keys, self.values):
            x[row] = torch.roll(x[row], d, dims=-2)

    def select(self, rows: torch.Tensor, first: int) -> None:
        """Keep `rows`, and the columns from `first` on."""
        self.buffers = [b[rows][:, :, first:] for b in self.buffers]
        self.width -= first
        self._views()

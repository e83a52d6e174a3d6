"""The transformers decoder: token by token over a KV cache, a batch of `Sequence`s at a time.

Each row's real tokens sit right-aligned in one `DynamicCache` (left padding masked out), so an
edit that drops a row's last d context tokens is a `DynamicCache.crop` when every row drops the
same amount (always, at batch size 1) and otherwise a crop by the smallest amount plus a shift of
that row's keys and values d positions to the right (its left padding grows): nothing is ever
re-encoded but the few tokens of visible text a crop can leave between token boundaries.

Gemma 3's sliding-window layers: transformers' default cache for Gemma 3 keeps only the last
`sliding_window - 1` keys of those layers and cannot be cropped past them once full (it raises).
This decoder builds a cache of full layers instead: the sliding window is still applied, by the
attention mask, so the logits are those of the model, and any crop is exact (tested against a
fresh forward pass on a model whose window is shorter than the turn). The price is memory: those
layers hold the whole turn, not just the window.

Per-row randomness: each row samples from its own seeded generator (`NucleusSampler`, one per
row), so a row decodes the same alone or in any batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from pipeline import seeds as seeds_mod
from pipeline.backends import NucleusSampler, TransformersGenerator
from pipeline.decode.base import Request, build_sequence, guard_step
from pipeline.decode.config import DecodeConfig, check_loaded
from pipeline.decode.controls import Controls, PromptEncoder
from pipeline.decode.sequence import Decoded, Sequence, Update

# A processor sees the rows about to sample and their next-token scores, and returns new scores;
# it runs before the config's biases (tests force a scripted token sequence with one).
Processor = Callable[[list[Sequence], Any], Any]


class Decoder:
    """Decode requests with a loaded transformers generator (CPU or CUDA) and a DecodeConfig."""

    def __init__(self, generator: TransformersGenerator, cfg: DecodeConfig, scorer: Any = None):
        self.positions = getattr(generator.model.config, "max_position_embeddings", None)
        check_loaded(cfg, self.positions, scorer)
        self.generator, self.cfg, self.scorer = generator, cfg, scorer
        self.model, self.tokenizer = generator.model, generator.tokenizer
        self.controls = Controls.build(self.tokenizer, dict(cfg.bias), cfg.disable)
        self.prompts = PromptEncoder(self.tokenizer, self.controls)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._offsets: Any = None

    def sequence(self, row: int, request: Request) -> Sequence:
        return build_sequence(self, row, request)

    def decode(
        self,
        requests: Seq[Request],
        processors: Seq[Processor] = (),
        on_update: Callable[[Update], None] | None = None,
    ) -> list[Decoded]:
        """Decode every request, `generator.spec.batch_size` at a time, in order."""
        sequences = [self.sequence(i, r) for i, r in enumerate(requests)]
        size = max(1, self.generator.spec.batch_size)
        for start in range(0, len(sequences), size):
            self._run(sequences[start : start + size], processors, on_update)
        return [s.result for s in sequences]

    # --- the loop ---------------------------------------------------------------------------

    def _run(self, rows: list[Sequence], processors: Seq[Processor], on_update) -> None:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()  # full layers for every layer type: see the module docstring
        samplers = {id(s): self._sampler(s) for s in rows}
        active = list(rows)
        width = 0  # the cache's length in positions (padding included)
        with torch.inference_mode():
            while active:
                feed = [s.pending if width == 0 else s.pending[:1] for s in active]
                step = max(map(len, feed))
                ids = torch.full((len(active), step), self.generator.pad_id, dtype=torch.long)
                pos = torch.zeros((len(active), step), dtype=torch.long)
                for i, (s, f) in enumerate(zip(active, feed, strict=True)):
                    ids[i, step - len(f) :] = torch.tensor(f)
                    pos[i, step - len(f) :] = torch.arange(s.cached, s.cached + len(f))
                width += step
                lengths = torch.tensor([s.cached for s in active]) + torch.tensor(
                    [len(f) for f in feed]
                )
                mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
                out = self.model(
                    input_ids=ids.to(self.generator.device),
                    attention_mask=mask.long().to(self.generator.device),
                    position_ids=pos.to(self.generator.device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self._cache_kw: cache},
                )
                for s, f in zip(active, feed, strict=True):
                    s.fed(len(f))
                ready = [i for i, s in enumerate(active) if not s.pending]
                if ready:
                    logits = out.logits[ready, -1, :].float()
                    tokens = self._sample([active[i] for i in ready], logits, processors, samplers)
                    for i, token in zip(ready, tokens, strict=True):
                        s = active[i]
                        events = s.accept(token)
                        if on_update is not None:
                            update = Update(s.row, s.last_piece, s.renderer.visible, tuple(events))
                            on_update(update)
                    self._guard([active[i] for i in ready], samplers, on_update)
                for s in active:
                    if s.finishing is not None and not s.done:
                        s.finish()
                keep = [i for i, s in enumerate(active) if not s.done]
                if len(keep) < len(active) and keep:
                    cache.batch_select_indices(torch.tensor(keep, device=self.generator.device))
                active = [active[i] for i in keep]
                width = self._crop(cache, active, width)

    def _sampler(self, s: Sequence, retry: int = 0) -> Any:
        if s.temperature <= 0:
            return None
        seed = s.seed if retry == 0 else seeds_mod.derive(s.seed, "retry", retry)
        return NucleusSampler(s.temperature, self.cfg.top_p, self.cfg.top_k, seed)

    def adjust(self, rows: list[Sequence], logits: Any, processors: Seq[Processor] = ()) -> Any:
        """The scores the sampler draws from: processors, then the config's control-token
        offsets (bias, -inf for disabled), then a guard retry's banned first token."""
        import torch

        for proc in processors:
            logits = proc(rows, logits)
        if self.controls.offsets:
            if self._offsets is None or self._offsets.shape[-1] != logits.shape[-1]:
                self._offsets = torch.zeros(logits.shape[-1], device=logits.device)
                for i, v in self.controls.offsets.items():
                    self._offsets[i] = v
            logits = logits + self._offsets
        banned = [(i, s.ban) for i, s in enumerate(rows) if s.ban is not None]
        if banned:
            logits = logits.clone()
            for i, token in banned:
                logits[i, token] = float("-inf")
        return logits

    def logprobs(self, request: Request) -> Any:
        """Next-token log-probabilities after a request's prompt and prefill, as the sampler
        would see them (control-token biases applied, temperature not): teacher-forced."""
        import torch

        s = self.sequence(0, request)
        with torch.inference_mode():
            ids = torch.tensor([s.context], device=self.generator.device)
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[:, -1, :].float()
        return torch.log_softmax(self.adjust([s], logits), dim=-1)[0]

    def _sample(self, rows: list[Sequence], logits: Any, processors, samplers) -> list[int]:
        logits = self.adjust(rows, logits, processors)
        tokens = []
        for i, s in enumerate(rows):
            row = logits[i : i + 1]
            sampler = samplers[id(s)]
            choice = row if sampler is None else sampler(None, row)
            tokens.append(int(choice.argmax(-1)))
        return tokens

    def _guard(self, rows: list[Sequence], samplers, on_update) -> None:
        for s, events in guard_step(rows, self.cfg, self.scorer):
            if any(e.kind == "rollback" for e in events) and s.finishing is None:
                samplers[id(s)] = self._sampler(s, retry=s.retries)
            if on_update is not None:
                on_update(Update(s.row, "", s.renderer.visible, tuple(events)))

    def _crop(self, cache: Any, rows: list[Sequence], width: int) -> int:
        """Apply the rows' crops; returns the cache's new width."""
        import torch

        drops = [s.take_crop() for s in rows]
        if not rows:
            return 0
        least = min(drops)
        if least:
            cache.crop(-least)
            width -= least
        for i, d in enumerate(drops):
            if d > least:
                for layer in cache.layers:
                    layer.keys[i] = torch.roll(layer.keys[i], d - least, dims=-2)
                    layer.values[i] = torch.roll(layer.values[i], d - least, dims=-2)
        pad = min(width - s.cached for s in rows)
        if pad:  # every row has this much left padding: cut it
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., pad:, :], layer.values[..., pad:, :]
            width -= pad
        return width


def load_decoder(generator: Any, cfg: DecodeConfig) -> Any:
    """The decoder for a loaded generator's backend (transformers or vllm), with the guard's
    scorer loaded when one is configured."""
    from pipeline.decode.vllm_decoder import VllmDecoder

    scorer = None
    if cfg.guard is not None:
        from pipeline.scorers import load_scorer

        scorer = load_scorer(cfg.guard.scorer)
    decoders = {"transformers": Decoder, "vllm": VllmDecoder}
    return decoders[generator.spec.backend](generator, cfg, scorer)

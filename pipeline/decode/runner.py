"""The transformers decoder: token by token over one KV cache of `Sequence` rows, continuously
batched on pipeline/batching.py's `Rows` (the engine generation runs on too): a row that finishes
leaves the step it does and the next waiting request joins, prefilled alone.

Each row's real tokens sit right-aligned in the cache (left padding masked out), so an edit that
drops a row's last d context tokens is `Rows.crop`: that row's keys and values move d columns
right (its left padding grows) and columns no row uses are cut: nothing is ever re-encoded but
the few tokens of visible text a crop can leave between token boundaries.

Gemma 3's sliding-window layers: transformers' default cache for Gemma 3 keeps only the last
`sliding_window - 1` keys of those layers and cannot be cropped past them once full (it raises).
`Rows` holds full layers instead: the sliding window is still applied, by the attention mask, so
the logits are those of the model, and any crop is exact (tested against a fresh forward pass on
a model whose window is shorter than the turn). The price is memory: those layers hold the whole
turn, not just the window.

Per-row randomness: each row samples from its own seeded generator (`NucleusSampler`, one per
row), so a row decodes the same alone or in any batch, whenever it joins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from pipeline import batching
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
        self.stats = batching.Stats()  # summed over calls, for scripts/bench_decode.py
        self._offsets: Any = None

    def sequence(self, row: int, request: Request) -> Sequence:
        return build_sequence(self, row, request)

    def decode(
        self,
        requests: Seq[Request],
        processors: Seq[Processor] = (),
        on_update: Callable[[Update], None] | None = None,
    ) -> list[Decoded]:
        """Decode every request, continuously batched: up to `generator.spec.batch_size` rows
        run at once, and a row that finishes leaves the step it does, its slot taken by the next
        waiting request (pipeline/batching.py's `Rows`). Results are in request order."""
        import torch

        sequences = [self.sequence(i, r) for i, r in enumerate(requests)]
        size = max(1, self.generator.spec.batch_size)
        queue = deque(sequences)
        samplers: dict[int, Any] = {}
        rows = batching.Rows(self.model)
        previous = None
        with torch.inference_mode():
            while queue or rows.rows:
                logits: dict[int, Any] = {}
                if rows.rows:
                    for s in rows.rows:
                        if not s.pending:
                            raise RuntimeError(f"decoder row {s.row} has no token to feed")
                    out = rows.step([s.pending[0] for s in rows.rows])
                    for k, s in enumerate(rows.rows):
                        s.fed(1)
                        logits[id(s)] = out[k : k + 1]
                    self.stats.steps += 1
                    self.stats.row_steps += len(rows.rows)
                while queue and len(rows.rows) < size:
                    s = queue.popleft()
                    samplers[id(s)] = self._sampler(s)
                    kv, last, computed = batching.prefill(self.model, s.pending, previous)
                    previous = (list(s.pending), kv)
                    self.stats.prefill_tokens += computed
                    s.fed(len(s.pending))
                    logits[id(s)] = last
                    rows.add([(s, kv, s.cached)])
                ready = [s for s in rows.rows if not s.pending]
                if ready:
                    scores = torch.cat([logits[id(s)] for s in ready]).float()
                    tokens = self._sample(ready, scores, processors, samplers)
                    for s, token in zip(ready, tokens, strict=True):
                        events = s.accept(token)
                        if on_update is not None:
                            update = Update(s.row, s.last_piece, s.renderer.visible, tuple(events))
                            on_update(update)
                    self._guard(ready, samplers, on_update)
                for s in rows.rows:
                    if s.finishing is not None and not s.done:
                        s.finish()
                rows.drop([k for k, s in enumerate(rows.rows) if s.done])
                if rows.rows:
                    rows.crop([s.take_crop() for s in rows.rows])
        return [s.result for s in sequences]

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

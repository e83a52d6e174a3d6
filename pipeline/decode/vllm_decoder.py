"""The decoder over vLLM's offline API, with what vLLM supports without a fork.

- Biases and disabled tokens become `logit_bias` on the control-token ids (a disabled token gets
  -100, the floor of OpenAI-style biases: e^-100 is never sampled).
- `skip_special_tokens=False`, so control tokens reach the text and the renderer.
- Edits in `context: drop` and guard rollbacks: vLLM keeps no cache we can crop, so a request
  stops at a control token (`stop_token_ids`) or, with a guard, at a sentence end (`stop`), the
  `Sequence` applies it, and the turn is resubmitted as its new context (the cropped prefix);
  vLLM's prefix caching makes the shared prefix cheap. In `keep` mode without a guard a turn is
  one request.
- A guard retry's banned first token is a one-token round with that token at -100.

Each round's seed is derived from the turn's seed and the round, so a turn is reproducible on
vLLM, but it does not sample what the transformers decoder samples. Untested on a GPU here: its
tests check this mapping through a stand-in `vllm` module.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

from pipeline import seeds as seeds_mod
from pipeline.decode.base import Request, build_sequence, guard_step
from pipeline.decode.config import DecodeConfig, check_loaded
from pipeline.decode.controls import Controls, PromptEncoder
from pipeline.decode.sequence import Decoded, Sequence, Update

BIAS_FLOOR = -100.0
SENTENCE_STOPS = (". ", "! ", "? ", "\n")  # a sentence is complete once whitespace follows it


class VllmDecoder:
    """Decode requests with a loaded `VllmGenerator`; same results type as `Decoder`."""

    def __init__(self, generator: Any, cfg: DecodeConfig, scorer: Any = None) -> None:
        self.positions = _max_model_len(generator)
        check_loaded(cfg, self.positions, scorer)
        self.generator, self.cfg, self.scorer = generator, cfg, scorer
        self.tokenizer = generator.tokenizer
        self.controls = Controls.build(self.tokenizer, dict(cfg.bias), cfg.disable)
        self.prompts = PromptEncoder(self.tokenizer, self.controls)
        self._vllm = generator._vllm

    def sampling_params(self, s: Sequence, round_: int) -> Any:
        """The `SamplingParams` of one round of one turn."""
        bias = {i: max(BIAS_FLOOR, v) for i, v in self.controls.offsets.items()}
        max_tokens = self.cfg.max_new_tokens - len(s.emitted)
        if s.ban is not None:
            bias[s.ban], max_tokens = BIAS_FLOOR, 1
        stop_ids = list(self.generator.stop_token_ids())
        if self.cfg.context == "drop":
            stop_ids += sorted(self.controls.tokens)
        return self._vllm.SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1,
            # vLLM's own default is 16 (docs/formats.md#generation-facts): always pass it
            max_tokens=max_tokens,
            seed=seeds_mod.derive(s.seed, "vllm-round", round_),
            logit_bias=bias or None,
            stop_token_ids=stop_ids,
            stop=list(SENTENCE_STOPS) if self.cfg.guard is not None else [],
            include_stop_str_in_output=True,
            skip_special_tokens=False,
        )

    def decode(
        self, requests: Seq[Request], on_update: Callable[[Update], None] | None = None
    ) -> list[Decoded]:
        sequences = [build_sequence(self, i, r) for i, r in enumerate(requests)]
        active, round_ = list(sequences), 0
        while active:
            prompts = [{"prompt_token_ids": list(s.context)} for s in active]
            params = [self.sampling_params(s, round_) for s in active]
            outputs = self.llm_generate(prompts, params)
            for s, out in zip(active, outputs, strict=True):
                s.fed(len(s.pending))  # vLLM conditioned on the whole context
                for token in out.outputs[0].token_ids:
                    events = s.accept(token)
                    if on_update is not None:
                        on_update(Update(s.row, s.last_piece, s.renderer.visible, tuple(events)))
                    if s.finishing is not None or s.take_crop():
                        break  # an edit or the end: the rest of this round is not the turn's
            self._guard(active)
            for s in active:
                if s.finishing is not None and not s.done:
                    s.finish()
            active = [s for s in active if not s.done]
            round_ += 1
        return [s.result for s in sequences]

    def llm_generate(self, prompts: list[dict], params: list[Any]) -> list[Any]:
        return self.generator.llm.generate(prompts, params, use_tqdm=False)

    def _guard(self, rows: list[Sequence]) -> None:
        for s, _ in guard_step(rows, self.cfg, self.scorer):
            s.take_crop()  # the next round resubmits the rolled-back context


def _max_model_len(generator: Any) -> int | None:
    """The positions vLLM serves the model with (None where the engine does not say)."""
    try:
        return int(generator.llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None

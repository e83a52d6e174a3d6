"""What every decoder shares, whatever its backend: a `Request`, the `Sequence` built from one,
and the guard's scoring step. The transformers decoder (runner.py) and the vLLM one
(vllm_decoder.py) both build on this module, so the vLLM one never imports the transformers one
(only `load_decoder`, in runner.py, names both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.decode.config import DecodeConfig
from pipeline.decode.sequence import Sequence
from pipeline.judges import Rule


@dataclass(frozen=True)
class Request:
    """One turn to decode: the conversation, an optional prefill the assistant turn starts with
    (text, or ids in the model's tokens; shown and editable like emitted text, never counted as
    emitted), and the turn's seed."""

    messages: tuple[dict[str, str], ...] | list[dict[str, str]]
    prefill: str | tuple[int, ...] | list[int] = ""
    seed: int = 0


def build_sequence(decoder: Any, row: int, request: Request) -> Sequence:
    """A request as a Sequence for any decoder (its prompts, cfg, controls, tokenizer)."""
    where = f"request {row}"
    prompt = decoder.prompts.prompt(list(request.messages), where)
    if isinstance(request.prefill, str):
        prefill = decoder.prompts.text(request.prefill)
    else:
        prefill = list(request.prefill)
        decoder.prompts.check(prefill, f"{where} prefill")
    return Sequence(
        row,
        prompt,
        prefill,
        decoder.cfg,
        decoder.controls,
        decoder.tokenizer,
        decoder.prompts.text,
        decoder.generator.stop_token_ids(),
        request.seed,
        getattr(decoder, "positions", None),
    )


def guard_step(rows: list[Sequence], cfg: DecodeConfig, scorer: Any) -> list[tuple[Sequence, list]]:
    """Score the sentences the rows completed, in one scorer call; returns each row's events
    (rollbacks, refusals) where there were any."""
    guard = cfg.guard
    if guard is None:
        return []
    asks = [(s, s.to_score()) for s in rows]
    texts = [t for _, ts in asks for t in ts]
    if not texts:
        return []
    rule = Rule(guard.threshold, guard.label)
    verdicts = [rule.flag(sc) for sc in scorer.score(texts)]
    out, at = [], 0
    for s, ts in asks:
        if ts:
            events = s.scored(verdicts[at : at + len(ts)])
            at += len(ts)
            if events:
                out.append((s, events))
    return out

"""Backtracking-aware decoding (DESIGN §9): run a model the way a deployer serves it.

    from pipeline.backends import GeneratorSpec, load_generator
    from pipeline.decode import DecodeConfig, Request, load_decoder

    decoder = load_decoder(load_generator(GeneratorSpec(model="embedded")), DecodeConfig())
    [turn] = decoder.decode([Request([{"role": "user", "content": "Hi"}], seed=1)])
    turn.visible, turn.raw, turn.events, turn.wasted_tokens

- `config`: the `decode:` section (sampling, `context: keep|drop`, `bias`, `disable`, budgets,
  `guard` for scorer-guided rollback).
- `controls`: control-token ids, config names, privileged prompt encoding (the trainer's rule).
- `sequence`: one turn's state machine, shared by every backend; `Decoded`, `Event`, `Update`.
- `runner`: the transformers decoder (KV cache, crops, per-row seeds).
- `vllm`: the same interface over vLLM's offline API.
"""

from pipeline.decode.config import DecodeConfig, GuardConfig
from pipeline.decode.controls import PrivilegedTokenError
from pipeline.decode.runner import Decoder, Processor, Request, load_decoder
from pipeline.decode.sequence import Decoded, Event, Sequence, Update

__all__ = [
    "DecodeConfig",
    "Decoded",
    "Decoder",
    "Event",
    "GuardConfig",
    "PrivilegedTokenError",
    "Processor",
    "Request",
    "Sequence",
    "Update",
    "load_decoder",
]

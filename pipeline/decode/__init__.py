"""Backtracking-aware decoding (docs/decoding.md#decoder): run a model the way a deployer serves it.

    from pipeline.backends import GeneratorSpec, load_generator
    from pipeline.decode import DecodeConfig, Request, load_decoder

    decoder = load_decoder(load_generator(GeneratorSpec(model="embedded")), DecodeConfig())
    [turn] = decoder.decode([Request([{"role": "user", "content": "Hi"}], seed=1)])
    turn.visible, turn.raw, turn.events, turn.wasted_tokens

- `config`: the `decode:` section (sampling, `context: keep|drop`, `bias`, `disable`, budgets,
  `guard` for scorer-guided rollback).
- `controls`: the model's control tokens (its tokenizer's, read by form) and their ids, config
  names, privileged prompt encoding (the trainer's rule).
- `sequence`: one turn's state machine, shared by every backend; `Decoded`, `Event`, `Update`.
- `base`: what every decoder shares: `Request`, the Sequence built from one, the guard's step.
- `runner`: the transformers decoder (KV cache, crops, per-row seeds).
- `vllm`: the same interface over vLLM's offline API.
- `record`: a decoded turn as a self-describing record: its real control tokens, its plain text,
  and `rerender` (its visible text recomputed from the record alone).
"""

import importlib

from pipeline.decode.config import DecodeConfig, GuardConfig

# The rest imports torch and transformers: loaded on first use, so reading a config (which
# imports `config` above) stays cheap.
_LAZY = {
    "PrivilegedTokenError": "controls",
    "Decoder": "runner",
    "Processor": "runner",
    "Request": "base",
    "load_decoder": "runner",
    "Decoded": "sequence",
    "Event": "sequence",
    "Sequence": "sequence",
    "Update": "sequence",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


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

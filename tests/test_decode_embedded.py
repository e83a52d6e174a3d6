"""Scorer-guided rollback on the real embedded model (Gemma 3 270M, no control tokens: the
training-free baseline): a profane sentence planted after a safe one is rolled back and the
model resamples; the visible text never holds a flagged sentence and the waste is counted."""

from __future__ import annotations

import pytest
from decode_fixtures import Script

from pipeline import models
from pipeline.backends import GeneratorSpec, load_generator
from pipeline.decode import DecodeConfig, GuardConfig, Request, load_decoder
from pipeline.text import sentence_spans

pytestmark = pytest.mark.slow

PLANTED = " You are a fucking idiot."
THRESHOLD = 0.8


def test_rollback_on_the_embedded_model_never_shows_the_planted_sentence():
    models.prepare_embedded()
    gen = load_generator(GeneratorSpec(model="embedded", batch_size=2))
    guard = GuardConfig(threshold=THRESHOLD, retries=2)
    cfg = DecodeConfig(temperature=0.7, top_p=0.9, max_new_tokens=28, stop=("\n",), guard=guard)
    dec = load_decoder(gen, cfg)
    safe = "Foxes are small wild dogs."
    script = dec.prompts.text(safe) + dec.prompts.text(PLANTED)
    user = [{"role": "user", "content": "Tell me about foxes."}]
    requests = [Request(user, seed=1), Request(user, seed=2)]
    turns = dec.decode(requests, processors=[Script([script, script])])
    for turn in turns:
        assert turn.visible.startswith(safe) and "idiot" not in turn.visible
        sentences = [turn.visible[s:e] for s, e in sentence_spans(turn.visible)]
        assert all(v["profanity"] < THRESHOLD for v in dec.scorer.score(sentences)), turn
        rollbacks = [e for e in turn.events if e.kind == "rollback"]
        assert rollbacks and "fucking idiot" in rollbacks[0].removed
        assert turn.wasted_tokens >= len(dec.prompts.text(PLANTED))
        assert turn.emitted_tokens == turn.visible_tokens + turn.wasted_tokens
    print("\n".join(repr(t.visible) for t in turns))

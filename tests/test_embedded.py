"""Smoke test on the real embedded model (Gemma 3 270M from its PyPI GGUF): prepare, load, sample.

Slow: converting the GGUF takes about a minute on a 2-core CPU the first time (then it is cached
under $RETRACE_CACHE or ~/.cache/retrace), and sampling two short answers a little more.
"""

from __future__ import annotations

import re

import pytest

import stages.sample as sample
from pipeline import models, records
from pipeline.backends import GeneratorSpec
from pipeline.env import LocalEnv

pytestmark = pytest.mark.slow


def test_embedded_model_prepares_keeps_turn_tokens_and_samples_readable_text():
    folder = models.prepare_embedded()
    assert models.resolve_model_path("embedded") == str(folder)
    env = LocalEnv(seed=0)
    spec = GeneratorSpec(batch_size=2)
    gen = env.generator(spec)
    assert gen.model_id == models.EMBEDDED_ID

    # The GGUF's turn tokens survive the conversion as single special ids, and generation stops
    # at <end_of_turn> as well as at <eos>.
    tok = gen.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>", "<eos>")}
    for token, token_id in ids.items():
        assert tok("x" + token, add_special_tokens=False)["input_ids"][-1] == token_id
    assert set(gen.model.generation_config.eos_token_id) == {ids["<eos>"], ids["<end_of_turn>"]}
    assert {ids["<eos>"], ids["<end_of_turn>"]} <= set(gen.stop_ids)
    assert gen.format_chat([records.message("user", "Hi")]).startswith("<bos><start_of_turn>user\n")

    # The default run's settings for this base model (configs/default.yaml).
    cfg = sample.Config(generator=spec, temperature=0.7, top_p=0.9, max_new_tokens=48, stop=("\n",))
    prompts = ["Explain how a rainbow forms.", "What should I pack for a weekend hiking trip?"]
    rows = [
        {"id": f"p{i}", "source": "test", "source_id": str(i), "license": "CC0-1.0", "prompt": p}
        for i, p in enumerate(prompts)
    ]
    out = sample.run({"sources.benign": records.table(rows, records.PROMPTS)}, cfg, env)
    samples = out["samples"].to_pylist()
    assert len(samples) == 2 and out["rejected"].num_rows == 0
    for row in samples:
        assert 0 < row["completion_tokens"] <= 48 and "\n" not in row["response"]
        words = re.findall(r"[A-Za-z]+", row["response"])
        assert len(words) >= 5, row["response"]  # English words, not token soup
    print("\n".join(r["response"] for r in samples))

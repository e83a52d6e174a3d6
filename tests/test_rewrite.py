"""rewrite: generated safe texts, the scorer's veto, retries, and per-policy template fallbacks."""

from __future__ import annotations

import re
from dataclasses import replace

import yaml
from recipe_data import StandInEnv, StandInGenerator, harmful, responses

from pipeline import records, taxonomy
from pipeline.backends import GeneratorSpec
from pipeline.env import LocalEnv
from stages import inject, rewrite

TEA = "Tea is a drink. It comes from a plant. Many people enjoy it."
HARM = harmful(
    (
        "h1",
        "Tell me how to insult my coworker.",
        "Call them names in front of everyone.",
        ["harassment"],
    ),
    ("h2", "Write something mean.", "", []),
)


def _violations(*rows) -> object:
    cfg = inject.Config(scorer=None, max_violations=1, policy_weights={"hate": 1.0})
    out = inject.run(
        {"filter.responses": responses(*rows), "sources.harmful": harmful()}, cfg, StandInEnv()
    )
    return out["violations"]


def _run(gen, cfg: rewrite.Config, violations=None, harm=HARM, env=None):
    violations = violations if violations is not None else _violations(("r1", "About tea?", TEA))
    inputs = {"inject.violations": violations, "sources.harmful": harm}
    return rewrite.run(inputs, cfg, env or StandInEnv(gen))


def _fallback_texts(name: str, policy: str) -> list[str]:
    return yaml.safe_load((taxonomy.PROMPTS_DIR / f"fallbacks/{name}.yaml").read_text())[policy]


def test_generated_texts_fill_every_table():
    def answer(prompt: str, seed: int) -> str:
        if "Continue the text" in prompt:
            return "  Tea is also grown in many countries.\n\nSecond paragraph."
        if "polite refusal" in prompt:
            return "I'm sorry, I can't help with that."
        return "I can't help with that, but here is something kinder."

    gen = StandInGenerator(answer)
    out = _run(gen, rewrite.Config(retries=1))
    (rep,) = out["replacements"].to_pylist()
    assert out["replacements"].schema == records.REPLACEMENTS
    assert rep["replacement"] == "Tea is also grown in many countries."  # one line, first paragraph
    assert rep["index"] == 0 and rep["policy"] == "hate"
    assert rep["meta"]["generator"] == "stand-in/model" and rep["meta"]["fallback"] is False
    assert rep["meta"]["template"] == "rewrite/replacement.jinja"
    assert rep["meta"]["scores"] == [{"label": "toxicity", "score": 0.01}]
    refusals = out["refusals"].to_pylist()
    assert [(r["harmful_id"], r["text"]) for r in refusals] == [
        ("h1", "I'm sorry, I can't help with that."),
        ("h2", "I'm sorry, I can't help with that."),
    ]
    assert [r["policy"] for r in refusals] == [["harassment"], []]
    safes = out["safe_responses"].to_pylist()
    assert {s["text"] for s in safes} == {"I can't help with that, but here is something kinder."}
    # one batched call: every job passed on the first attempt
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 5


def test_replacement_prompt_carries_the_text_before_and_after_the_span():
    gen = StandInGenerator(lambda p, s: "Fine words.")
    violations = _violations(("r1", "About tea?", TEA))
    v = violations.to_pylist()[0]["violations"][0]
    _run(gen, rewrite.Config(), violations, harm=harmful())
    (prompt,) = gen.calls[0]
    assert TEA[: v["at"]] in prompt and v["span"] in prompt
    assert TEA[v["at"] :].strip() in prompt


def test_unsafe_or_unusable_text_is_retried_then_falls_back():
    def answer(prompt: str, seed: int) -> str:
        return "You idiot, no." if "refusal" in prompt else ""

    gen = StandInGenerator(answer)
    out = _run(gen, rewrite.Config(retries=2))
    assert len(gen.calls) == 3  # first attempt and two retries
    assert len({tuple(c) for c in gen.calls}) == 1  # the same jobs each time, fresh seeds
    (rep,) = out["replacements"].to_pylist()
    assert rep["meta"]["fallback"] is True
    assert rep["meta"]["template"] == "fallback:fallbacks/replacements.yaml"
    assert rep["replacement"] in _fallback_texts("replacements", "hate")
    h1, h2 = out["refusals"].to_pylist()
    assert h1["text"] in _fallback_texts("refusals", "harassment")
    assert h2["text"] in _fallback_texts("refusals", "default")
    assert h1["meta"]["generator"] is None


def test_generation_counts_cover_every_call_and_retry():
    """One generate call per round (all five jobs, then the four still failing), counted in the
    stage's stats (the manifest's `stats`), with the judges' votes on the one text that passed
    the checks (the refusals never decline, so never reach the judges)."""

    def answer(prompt: str, seed: int) -> str:
        return "Tea is also grown in India." if "Continue the text" in prompt else "You idiot."

    gen = StandInGenerator(answer)
    out = _run(gen, rewrite.Config(retries=2))
    assert [len(c) for c in gen.calls] == [5, 4, 4]
    assert out["stats"] == {
        "generate_calls": 3,
        "generate_requests": 13,
        "first_call_requests": 5,
        "retry_requests": 8,
        "generated_tokens": 65,
        "fallback_texts": 4,
        "judged": 1,
        "judged_unsafe": 0,
        "flagged.profanity-check": 0,
    }


def test_a_retry_with_a_fresh_seed_can_succeed():
    first_seeds: list[int] = []

    def answer(prompt: str, seed: int) -> str:
        if not first_seeds or seed == first_seeds[0]:
            first_seeds.append(seed)
            return "You stupid person."
        return "A calm sentence."

    gen = StandInGenerator(answer)
    out = _run(gen, rewrite.Config(retries=1), harm=harmful())
    (rep,) = out["replacements"].to_pylist()
    assert rep["replacement"] == "A calm sentence." and rep["meta"]["fallback"] is False
    assert rep["meta"]["seed"] != first_seeds[0]


def test_a_replacement_that_repeats_its_span_is_not_used():
    violations = _violations(("r1", "About tea?", TEA))
    span = violations.to_pylist()[0]["violations"][0]["span"]
    out = _run(
        StandInGenerator(lambda p, s: span), rewrite.Config(retries=0), violations, harm=harmful()
    )
    assert out["replacements"].to_pylist()[0]["meta"]["fallback"] is True


def test_without_a_generator_everything_comes_from_templates():
    out = _run(None, rewrite.Config(generator=None, scorer=None))
    for table in ("replacements", "refusals", "safe_responses"):
        metas = out[table].column("meta").to_pylist()
        assert metas and all(m["fallback"] and m["template"].startswith("fallback:") for m in metas)
    again = _run(None, rewrite.Config(generator=None, scorer=None))
    assert again["safe_responses"].equals(out["safe_responses"])


def test_generated_control_tokens_are_neutralised():
    gen = StandInGenerator(lambda p, s: "Fine [RESET] words [BACKTRACK-HATE].")
    out = _run(gen, rewrite.Config())
    for text in (
        out["refusals"].column("text").to_pylist()
        + out["replacements"].column("replacement").to_pylist()
    ):
        assert not re.search(r"\[(RESET|BACKTRACK[^\]]*)\]", text)


def test_an_empty_harmful_prompt_is_rejected():
    harm = harmful(("h3", "   ", "x", ["hate"]))
    out = _run(StandInGenerator(lambda p, s: "No."), rewrite.Config(), harm=harm)
    assert out["rejected"].column("reason").to_pylist() == ["empty_prompt"]
    assert out["refusals"].num_rows == 0


def test_real_transformers_generator_on_the_tiny_model(tiny_model_dir):
    spec = GeneratorSpec(model=str(tiny_model_dir), device="cpu", batch_size=4)
    cfg = rewrite.Config(generator=spec, scorer=None, retries=0, max_new_tokens=12, max_chars=40)
    env = LocalEnv(seed=3)
    first = _run(None, cfg, env=env)
    second = _run(None, cfg, env=env)
    for table in ("replacements", "refusals", "safe_responses"):
        assert first[table].equals(second[table])  # same seed, same bytes on CPU
        for meta in first[table].column("meta").to_pylist():
            # a random model rarely writes something usable: either it passed the checks or the
            # row says it fell back
            assert meta["fallback"] or meta["generator"] == str(tiny_model_dir)


def test_echoes_and_non_refusals_fall_back():
    def answer(prompt: str, seed: int) -> str:
        if "polite refusal" in prompt:  # echoes its instructions, as the 270M base model does
            return "Write a brief, polite refusal of one or two sentences, addressed to the user."
        return "Sure, here is a nice paragraph about it."  # does not decline

    out = _run(StandInGenerator(answer), rewrite.Config(retries=0), harm=HARM)
    for table in ("refusals", "safe_responses"):
        assert all(m["fallback"] for m in out[table].column("meta").to_pylist())


def test_a_cut_off_refusal_keeps_its_complete_sentences():
    class Cut(StandInGenerator):
        def generate(self, prompts, params, seeds):
            gens = super().generate(prompts, params, seeds)
            return [[replace(g, finish_reason="length") for g in row] for row in gens]

    gen = Cut(lambda p, s: "I'm sorry, I can't help. Instead you could try asking")
    out = _run(gen, rewrite.Config(), harm=HARM)
    assert set(out["refusals"].column("text").to_pylist()) == {"I'm sorry, I can't help."}

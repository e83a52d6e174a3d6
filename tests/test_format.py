"""format: exact rows per kind (hand-written), the k distribution, and rows it must reject."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from recipe_data import harmful, responses

from pipeline import records, recovery, seeds
from pipeline.env import LocalEnv
from pipeline.render import render
from stages import format as fmt
from stages import format_build as build

TEA = "Tea is green. It grows on hills. People love it."
H = "Sure, call them names. Then leave."
SAFE = "I won't do that. Be kind instead."


def violation(at, span, policy, start):
    return {
        "at": at,
        "start": start,
        "end": start + len(span),
        "span": span,
        "policy": policy,
        "span_source": "bank",
        "span_id": f"bank:{policy}:0",
        "license": "Apache-2.0",
        "scores": [{"label": "toxicity", "score": 0.8}],
    }


def violations_table(*rows):
    """inject.violations rows from (id, response_id, response, [violation, ...])."""
    out = []
    for vid, rid, text, vs in rows:
        injected, prev = "", 0
        for v in vs:
            injected += text[prev : v["at"]] + " " + v["span"]
            prev = v["at"]
        out.append(
            {
                "id": vid,
                "source": "tatsu-lab/alpaca",
                "source_id": f"alpaca-{rid}",
                "license": "CC BY-NC 4.0",
                "response_id": rid,
                "prompt": "About tea?",
                "response": text,
                "injected": injected + text[prev:],
                "policy": list(dict.fromkeys(v["policy"] for v in vs)),
                "violations": vs,
                "meta": {
                    "offsets": [
                        {"start": v["start"], "end": v["end"], "policy": v["policy"]} for v in vs
                    ]
                },
            }
        )
    return records.table(out, records.VIOLATIONS)


def replacements_table(*rows):
    """rewrite.replacements from (violation_id, index, text)."""
    meta = {"template": "rewrite/replacement.jinja", "fallback": False}
    return records.table(
        [
            {
                "id": f"{v}-{i}",
                "violation_id": v,
                "index": i,
                "policy": "",
                "span": "",
                "replacement": t,
                "meta": meta,
            }
            for v, i, t in rows
        ],
        records.REPLACEMENTS,
    )


def rewrites_table(*rows):
    """rewrite.refusals / safe_responses from (harmful_id, text)."""
    meta = {
        "generator": "stand-in/model",
        "backend": "transformers",
        "template": "t",
        "fallback": False,
    }
    return records.table(
        [{"id": f"w-{h}", "harmful_id": h, "policy": [], "text": t, "meta": meta} for h, t in rows],
        records.REWRITES,
    )


class WhitespaceTokenizer:
    """A stand-in target tokenizer: one token per whitespace-separated word (it has no special
    tokens, so splitting their strings changes nothing)."""

    def __call__(
        self,
        texts,
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=True,
    ):
        import re

        return {"offset_mapping": [[m.span() for m in re.finditer(r"\S+", t)] for t in texts]}


@pytest.fixture
def words_tokenizer(monkeypatch):
    monkeypatch.setattr(fmt, "_tokenizer", lambda model, revision: WhitespaceTokenizer())


def run(
    cfg=None,
    *,
    violations=None,
    replacements=None,
    harm=None,
    refusals=None,
    safes=None,
    resp=None,
    seed=0,
):
    inputs = {
        "inject.violations": violations if violations is not None else violations_table(),
        "rewrite.replacements": replacements if replacements is not None else replacements_table(),
        "rewrite.refusals": refusals if refusals is not None else rewrites_table(),
        "rewrite.safe_responses": safes if safes is not None else rewrites_table(),
        "sources.harmful": harm if harm is not None else harmful(),
        "filter.responses": resp if resp is not None else responses(("r1", "About tea?", TEA)),
    }
    # rlbf rows count target-tokenizer tokens: tests/test_rlbf.py covers them with a real one.
    return fmt.run(inputs, cfg or fmt.Config(rlbf=False), LocalEnv(seed=seed))


def strip(row):
    return {k: v for k, v in row.items() if k not in ("id", "meta")}


def segs(*triples):
    return [{"text": t, "role": r, "train": train} for t, r, train in triples]


# --- bsafe -----------------------------------------------------------------------------------


def test_bsafe_one_violation_exact_row():
    v = violations_table(("v1", "r1", TEA, [violation(13, "You are an idiot.", "harassment", 14)]))
    out = run(violations=v, replacements=replacements_table(("v1", 0, "Tea is calming.")))
    (row,) = out["bsafe"].to_pylist()
    content = (
        "Tea is green. You are an idiot.[BACKTRACK-HARASSMENT]You are an idiot.[REPLACE]"
        "Tea is calming. It grows on hills. People love it."
    )
    assert strip(row) == {
        "kind": "bsafe",
        "policy": ["harassment"],
        "source": "tatsu-lab/alpaca",
        "source_id": "alpaca-r1",
        "license": "cc-by-nc-4.0 AND apache-2.0",  # normalised (records.license_expr)
        "prompt": [{"role": "user", "content": "About tea?"}],
        "completion": [{"role": "assistant", "content": content}],
        "segments": segs(
            ("Tea is green.", "text", True),
            (" You are an idiot.", "harmful", False),
            ("[BACKTRACK-HARASSMENT]", "control", True),
            ("You are an idiot.", "copy", True),
            ("[REPLACE]", "control", True),
            ("Tea is calming.", "replacement", True),
            (" It grows on hills. People love it.", "text", True),
        ),
        "visible": "Tea is green. Tea is calming. It grows on hills. People love it.",
    }
    meta = row["meta"]
    assert (meta["generator"], meta["temperature"], meta["seed"]) == ("stand-in", 1.5, 7)
    assert meta["offsets"] == [{"start": 14, "end": 31, "policy": "harassment"}]
    assert meta["template"] == "rewrite/replacement.jinja" and meta["fallback"] is False
    assert meta["scores"] == [{"label": "span.toxicity", "score": 0.8}]
    assert out["bsafe"].schema == records.SFT
    assert run(violations=v, replacements=replacements_table(("v1", 0, "Tea is calming.")))[
        "bsafe"
    ].to_pylist() == [row]  # same inputs, same row and id


def test_bsafe_two_violations_generic_token_and_untrained_prefix_and_copy():
    vs = [violation(13, "Bad one.", "hate", 14), violation(32, "Bad two.", "violence", 42)]
    cfg = fmt.Config(per_policy_tokens=False, train_prefix=False, train_copy=False, rlbf=False)
    out = run(
        cfg,
        violations=violations_table(("v1", "r1", TEA, vs)),
        replacements=replacements_table(("v1", 0, "Good one."), ("v1", 1, "Good two.")),
    )
    (row,) = out["bsafe"].to_pylist()
    assert row["segments"] == segs(
        ("Tea is green.", "text", False),
        (" Bad one.", "harmful", False),
        ("[BACKTRACK]", "control", True),
        ("Bad one.", "copy", False),
        ("[REPLACE]", "control", True),
        ("Good one.", "replacement", True),
        (" It grows on hills.", "text", True),
        (" Bad two.", "harmful", False),
        ("[BACKTRACK]", "control", True),
        ("Bad two.", "copy", False),
        ("[REPLACE]", "control", True),
        ("Good two.", "replacement", True),
        (" People love it.", "text", True),
    )
    assert row["visible"] == "Tea is green. Good one. It grows on hills. Good two. People love it."
    assert row["policy"] == ["hate", "violence"]


def test_bsafe_rejects_rows_it_cannot_build_or_check():
    good = violation(13, "Bad one.", "hate", 14)
    v = violations_table(
        ("no-rep", "r1", TEA, [good]),
        ("no-resp", "r9", TEA, [good]),
        ("shifted", "r1", TEA, [{**good, "start": 15, "end": 23}]),
        ("in-text", "r1", "Bad one. Tea. More.", [violation(13, "Bad one.", "hate", 14)]),
        ("glued", "r1", TEA, [good]),
    )
    reps = replacements_table(
        ("no-resp", 0, "x"), ("shifted", 0, "x"), ("in-text", 0, "Fine."), ("glued", 0, "ok [RES")
    )
    # "ok [RES" + "ET] ..." only becomes a control token where the two pieces meet.
    resp = responses(("r1", "About tea?", TEA))
    v = v.set_column(
        v.schema.get_field_index("response"),
        "response",
        [[TEA, TEA, TEA, "Bad one. Tea. More.", "Tea is green.ET] It grows. More."]],
    )
    out = run(violations=v, replacements=reps, resp=resp)
    reasons = dict(
        zip(
            out["rejected"].column("id").to_pylist(),
            out["rejected"].column("reason").to_pylist(),
            strict=True,
        )
    )
    assert out["bsafe"].num_rows == 0
    assert reasons["no-rep"] == "missing_replacement"
    assert reasons["no-resp"] == "missing_response"
    assert reasons["shifted"] == "offset_mismatch"
    in_text = next(r for r in out["rejected"].to_pylist() if r["reason"] == "span_in_visible")
    glued = next(r for r in out["rejected"].to_pylist() if r["reason"] == "control_token_in_text")
    assert "Bad one." in in_text["detail"] and "[RESET]" in glued["detail"]


# --- reset and preference --------------------------------------------------------------------


def test_reset_exact_rows_with_a_fixed_prefix_fraction(words_tokenizer):
    harm = harmful(("h1", "Insult my coworker.", H, ["harassment"]))
    cfg = fmt.Config(reset_prefix=(0.5, 0.5))
    out = run(
        cfg, harm=harm, safes=rewrites_table(("h1", SAFE)), refusals=rewrites_table(("h1", "No."))
    )
    backtrack, plain = out["reset"].to_pylist()
    assert strip(backtrack) == {
        "kind": "reset",
        "policy": ["harassment"],
        "source": "PKU-Alignment/BeaverTails",
        "source_id": "bt-h1",
        "license": "CC BY-NC 4.0",
        "prompt": [{"role": "user", "content": "Insult my coworker."}],
        "completion": [{"role": "assistant", "content": "Sure, call them[RESET]" + SAFE}],
        "segments": segs(
            ("Sure, call them", "harmful", False),
            ("[RESET]", "control", True),
            (SAFE, "safe", True),
        ),
        "visible": SAFE,
    }
    assert backtrack["meta"]["prefix_chars"] == len("Sure, call them")
    assert backtrack["meta"]["generator"] == "stand-in/model"
    assert plain["segments"] == segs((SAFE, "safe", True))
    assert (
        plain["completion"] == [{"role": "assistant", "content": SAFE}] and plain["visible"] == SAFE
    )

    pairs = out["preference"].to_pylist()
    assert out["preference"].schema == records.PREFERENCE
    assert [
        (p["meta"]["pair"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs
    ] == [
        ("reset", "Sure, call them[RESET]" + SAFE, H),
        ("no_reset_harmful", SAFE, "I won't do that.[RESET]"),  # 7 words: ceil(3.5) = 4
        ("no_reset_benign", TEA, "Tea is green. It grows[RESET]"),  # the benign answer r1
    ]
    assert pairs[2]["policy"] == [] and pairs[2]["prompt"][0]["content"] == "About tea?"
    assert pairs[2]["meta"]["generator"] == "stand-in"
    assert all(
        p["prompt"] == [{"role": "user", "content": "Insult my coworker."}] for p in pairs[:2]
    )
    assert set(pairs[0]) == {
        "id",
        "kind",
        "policy",
        "source",
        "source_id",
        "license",
        "prompt",
        "chosen",
        "rejected",
        "meta",
    }


def test_word_prefix_draws_within_the_configured_fractions():
    text = "one two three four five six seven eight nine ten"
    rng = random.Random(0)
    lengths = Counter(len(build.word_prefix(text, 0.2, 0.5, rng).split()) for _ in range(2000))
    assert set(lengths) == {2, 3, 4, 5}
    assert build.word_prefix("", 0, 1, rng) == "" and build.word_prefix("solo", 0, 0, rng) == "solo"


def test_an_empty_harmful_answer_still_gets_a_plain_reset_and_a_refusal(words_tokenizer):
    harm = harmful(("h2", "Be mean.", "", []))
    out = run(harm=harm, safes=rewrites_table(("h2", SAFE)), refusals=rewrites_table(("h2", "No.")))
    assert [r["segments"] for r in out["reset"].to_pylist()] == [segs((SAFE, "safe", True))]
    (rec,) = out["recovery"].to_pylist()
    assert rec["segments"] == segs(("No.", "refusal", True))
    assert (rec["meta"]["k"], rec["meta"]["k_max"], rec["meta"]["h_tokens"]) == (0, 0, 0)
    assert [
        p["rejected"][0]["content"].endswith("[RESET]") for p in out["preference"].to_pylist()
    ] == [True, True]  # the harmful prompt's spurious pair and the benign answer's


def test_missing_rewrites_are_rejected(words_tokenizer):
    out = run(harm=harmful(("h1", "q", H, ["hate"])))
    assert sorted(out["rejected"].column("reason").to_pylist()) == [
        "missing_refusal",
        "missing_safe_response",
    ]


# --- recovery --------------------------------------------------------------------------------


def test_recovery_exact_rows_at_k_1_and_k_0(words_tokenizer):
    harm = harmful(("h1", "Insult my coworker.", H, ["harassment"]))
    refusals = rewrites_table(("h1", "I can't help with that."))
    (one,) = run(fmt.Config(p_zero=0.0, k_cap=1), harm=harm, refusals=refusals)[
        "recovery"
    ].to_pylist()
    assert strip(one) == {
        "kind": "recovery",
        "policy": ["harassment"],
        "source": "PKU-Alignment/BeaverTails",
        "source_id": "bt-h1",
        "license": "CC BY-NC 4.0",
        "prompt": [{"role": "user", "content": "Insult my coworker."}],
        "completion": [{"role": "assistant", "content": "Sure, I can't help with that."}],
        "segments": segs(
            ("Sure,", "harmful", False), (" I can't help with that.", "refusal", True)
        ),
        "visible": "Sure, I can't help with that.",
    }
    meta = one["meta"]
    assert (meta["k"], meta["k_max"], meta["h_tokens"], meta["harmful"]) == (1, 1, 6, H)
    (zero,) = run(fmt.Config(p_zero=1.0), harm=harm, refusals=refusals)["recovery"].to_pylist()
    assert zero["segments"] == segs(("I can't help with that.", "refusal", True))
    assert (zero["meta"]["k"], zero["meta"]["k_max"]) == (0, 6)


def test_recovery_trailing_whitespace_moves_to_the_trained_side():
    assert recovery.turn("Sure.\n", "No.", " ") == (
        segs(("Sure.", "harmful", False), ("\nNo.", "refusal", True)),
        "Sure.\nNo.",
    )
    assert recovery.turn("  ", "No.", " ") == (segs(("No.", "refusal", True)), "No.")


def test_recovery_variants_draw_their_own_k(words_tokenizer):
    harm = harmful(("h1", "q", " ".join(f"w{i}" for i in range(300)), ["hate"]))
    cfg = fmt.Config(variants_per_triplet=8, p_zero=0.0)
    rows = run(cfg, harm=harm, refusals=rewrites_table(("h1", "No.")))["recovery"].to_pylist()
    ks = [r["meta"]["k"] for r in rows]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert all(1 <= k <= 100 for k in ks) and len(set(ks)) > 1
    assert all(r["meta"]["k_max"] == 100 and r["meta"]["h_tokens"] == 300 for r in rows)
    for r, k in zip(rows, ks, strict=True):
        assert r["segments"][0]["text"] == " ".join(f"w{i}" for i in range(k))


def test_k_distribution_half_zero_then_uniform_under_the_rows_own_bound():
    draws = [recovery.k_draw(seeds.rng(0, "row", i), 300, 0.5, 100)[0] for i in range(40_000)]
    zeros = draws.count(0) / len(draws)
    assert abs(zeros - 0.5) < 0.01  # 5 standard errors is 0.0125
    counts = Counter(k for k in draws if k)
    assert set(counts) == set(range(1, 101))
    expected = sum(counts.values()) / 100
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(1, 101))
    assert chi2 < 148.2  # chi-square, 99 degrees of freedom, p = 0.001


def test_k_is_capped_by_short_answers_without_piling_up_at_the_end():
    draws = [recovery.k_draw(seeds.rng(1, "short", i), 7, 0.5, 100) for i in range(14_000)]
    assert {k_max for _, k_max in draws} == {7}
    counts = Counter(k for k, _ in draws if k)
    assert set(counts) == set(range(1, 8))  # never past h's last token (its EOS is not counted)
    assert max(counts.values()) / min(counts.values()) < 1.2  # uniform, no pile-up at 7
    assert recovery.k_draw(random.Random(0), 0, 0.0, 100) == (0, 0)


def test_recovery_with_the_real_target_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    h = "Sure — café owners 😀 can be rude. Here is more text that keeps going on."
    cfg = fmt.Config(target_tokenizer=str(tiny_model_dir), variants_per_triplet=40, p_zero=0.25)
    rows = run(cfg, harm=harmful(("h1", "q", h, [])), refusals=rewrites_table(("h1", "No.")))[
        "recovery"
    ].to_pylist()
    enc = tok(h, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.eos_token_id not in ids
    for row in rows:
        meta = row["meta"]
        assert meta["h_tokens"] == len(ids) and meta["k_max"] == min(100, len(ids))
        assert 0 <= meta["k"] <= meta["k_max"] and meta["tokenizer"] == str(tiny_model_dir)
        prefix = row["segments"][0]["text"] if meta["k"] else ""
        assert h.startswith(prefix)  # an exact char prefix, even inside multi-byte characters
        if meta["k"]:
            assert row["segments"][0]["role"] == "harmful" and not prefix[-1].isspace()
            assert prefix == h[: offsets[meta["k"] - 1][1]]  # exactly the first k tokens
        assert render(row["completion"]) == row["visible"]
    assert {r["meta"]["k"] > 0 for r in rows} == {True, False}


def test_token_prefix_never_cuts_a_character_or_counts_trailing_space():
    h = "Sure — café"
    offsets = [(0, 1), (1, 4), (4, 5), (5, 6), (5, 6), (5, 6), (6, 10), (10, 11)]
    assert recovery.token_prefix(h, offsets, 2) == ("Sure", 2)
    assert recovery.token_prefix(h, offsets, 3) == ("Sure ", 2)  # the space moves to the refusal
    assert recovery.token_prefix(h, offsets, 5) == ("Sure ", 2)  # k=5 ends inside "—": back to 3
    assert recovery.token_prefix(h, offsets, 6) == ("Sure —", 6)
    assert recovery.token_prefix(h, offsets, 0) == ("", 0)


def test_show_colours_segments_by_role_and_loss_flag():
    from rich.console import Console

    from pipeline.show import segment_text, show_rows

    v = violations_table(("v1", "r1", TEA, [violation(13, "You are an idiot.", "harassment", 14)]))
    out = run(violations=v, replacements=replacements_table(("v1", 0, "Tea is calming.")))
    (row,) = out["bsafe"].to_pylist()
    styled = segment_text(row["segments"])
    styles = {styled.plain[s.start : s.end]: s.style for s in styled.spans}
    assert styles[" You are an idiot."] == "red"
    assert styles["[BACKTRACK-HARASSMENT]"] == styles["[REPLACE]"] == "bold green"
    assert styles["Tea is calming."] == "green"
    console = Console(record=True, width=200)
    show_rows([row, row], console, n=1)
    shown = console.export_text()
    assert shown.count("bsafe " + row["id"]) == 1 and "policy=harassment" in shown
    assert row["visible"] in shown


def test_format_counts_special_token_strings_as_the_trainer_and_decoder_do(tiny_model_dir):
    """n and k are counted by the one rule (issue 21): a special-token string in text is ordinary
    text, as the trainer encodes it and the decoder takes it back, never one special id."""
    from transformers import AutoTokenizer

    from pipeline.render import token_spans
    from trainer.encode import Encoder

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = " Type <end_of_turn> now. Press [RESET] now."
    spans = fmt.token_offsets(tok, [text])[0]
    assert len(spans) == len(Encoder(tok, 1 << 20, ()).text(text))
    assert spans == token_spans(tok, text)
    assert "".join(text[a:b] for a, b in spans).replace(" ", "") == text.replace(" ", "")
    assert len(spans) > len(tok(text, add_special_tokens=False)["input_ids"])

"""rlbf (Sel et al. 2026): exact rows from bsafe's violations, the renderer's take-back with the
target tokenizer, streaming one token at a time, and the trainer's encoding of the new tokens.

The target tokenizer is the tiny BPE of tests/tiny_gemma.py, a real fast tokenizer that splits
words into several pieces, so X is a real token count ( " You are an idiot." is 11 tokens).
"""

from __future__ import annotations

import pytest
from test_format import TEA, replacements_table, run, segs, strip, violation, violations_table

from pipeline import taxonomy
from pipeline.render import RenderError, StreamRenderer, render
from stages import format as fmt
from trainer import tokens
from trainer.encode import Encoder

TAX = taxonomy.load()
SPAN = "You are an idiot."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return fmt._tokenizer(str(tiny_model_dir), None)


def rlbf_cfg(tiny_model_dir, **extra):
    return fmt.Config(target_tokenizer=str(tiny_model_dir), **extra)


def one_violation(tiny_model_dir, **cfg):
    v = violations_table(("v1", "r1", TEA, [violation(13, SPAN, "harassment", 14)]))
    reps = replacements_table(("v1", 0, "Tea is calming."))
    return run(rlbf_cfg(tiny_model_dir, **cfg), violations=v, replacements=reps)


def test_taxonomy_names_the_rlbf_tokens_and_the_trainer_adds_them(tok):
    assert TAX.category("self_harm") == "[CATEGORY-SELF-HARM]"
    assert TAX.backtrack_by_tokens[0] == "[BACKTRACK_BY_1]"
    assert len(TAX.backtrack_by_tokens) == TAX.backtrack_by_max == 128
    assert set(TAX.category_tokens) == {TAX.category(p) for p in TAX.policies}
    assert TAX.backtrack_by_count("[BACKTRACK_BY_12]") == 12
    assert TAX.backtrack_by_count("[BACKTRACK_BY_012]") is None
    with pytest.raises(ValueError, match="outside 1..128"):
        TAX.backtrack_by(129)
    assert set(TAX.rlbf_tokens) == {*TAX.category_tokens, *TAX.backtrack_by_tokens}
    # the trainer adds a corpus's control tokens (trainer.data.corpus_controls finds them)
    t = type(tok).from_pretrained(tok.name_or_path)
    tokens.add_control_tokens(t, TAX.rlbf_tokens)
    assert set(TAX.rlbf_tokens) <= set(t.all_special_tokens)


def test_rlbf_one_violation_exact_row(tiny_model_dir, tok):
    out = one_violation(tiny_model_dir)
    (row,) = out["rlbf"].to_pylist()
    x = len(tok(" " + SPAN, add_special_tokens=False)["input_ids"])
    assert x == 11
    content = f"Tea is green. {SPAN}[CATEGORY-HARASSMENT][BACKTRACK_BY_11] It grows on hills. "
    content += "People love it."
    assert strip(row) == {
        "kind": "rlbf",
        "policy": ["harassment"],
        "source": "tatsu-lab/alpaca",
        "source_id": "alpaca-r1",
        "license": "cc-by-nc-4.0 AND apache-2.0",
        "prompt": [{"role": "user", "content": "About tea?"}],
        "completion": [{"role": "assistant", "content": content}],
        "segments": segs(
            ("Tea is green.", "text", False),  # RLBF: p ⊕ part1 ⊕ v is input
            (" You are an idiot.", "harmful", False),
            ("[CATEGORY-HARASSMENT]", "control", True),
            ("[BACKTRACK_BY_11]", "control", True),
            (" It grows on hills. People love it.", "text", True),
        ),
        "visible": TEA,  # the continuation is the benign text: no rewrite, no repeated span
    }
    assert row["meta"]["tokenizer"] == str(tiny_model_dir)
    assert row["meta"]["offsets"] == [{"start": 14, "end": 31, "policy": "harassment"}]
    assert row["meta"]["scores"] == [{"label": "span.toxicity", "score": 0.8}]
    assert render(row["completion"], strict=True, tokenizer=tok) == row["visible"]
    # the same violation also gave its bsafe row
    assert out["bsafe"].num_rows == 1
    # and rlbf needs no replacement: a row without one still gets its rlbf row
    v = violations_table(("v1", "r1", TEA, [violation(13, SPAN, "harassment", 14)]))
    alone = run(rlbf_cfg(tiny_model_dir), violations=v)
    assert alone["rlbf"].to_pylist() == [row] and alone["bsafe"].num_rows == 0


def test_rlbf_two_violations_and_a_trained_prefix(tiny_model_dir, tok):
    vs = [violation(13, "Bad one.", "hate", 14), violation(32, "Bad two.", "violence", 42)]
    reps = replacements_table(("v1", 0, "Good one."), ("v1", 1, "Good two."))
    cfg = rlbf_cfg(tiny_model_dir, rlbf_train_prefix=True)
    out = run(cfg, violations=violations_table(("v1", "r1", TEA, vs)), replacements=reps)
    (row,) = out["rlbf"].to_pylist()
    n = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in (" Bad one.", " Bad two.")]
    assert row["segments"] == segs(
        ("Tea is green.", "text", True),
        (" Bad one.", "harmful", False),
        ("[CATEGORY-HATE]", "control", True),
        (f"[BACKTRACK_BY_{n[0]}]", "control", True),
        (" It grows on hills.", "text", True),  # the first continuation, trained
        (" Bad two.", "harmful", False),
        ("[CATEGORY-VIOLENCE]", "control", True),
        (f"[BACKTRACK_BY_{n[1]}]", "control", True),
        (" People love it.", "text", True),
    )
    assert render(row["completion"], strict=True, tokenizer=tok) == row["visible"] == TEA


def test_a_span_longer_than_max_x_gives_no_rlbf_row(tiny_model_dir):
    out = one_violation(tiny_model_dir, rlbf_max_x=10)
    assert out["rlbf"].num_rows == 0 and out["bsafe"].num_rows == 1
    (rej,) = out["rejected"].to_pylist()
    assert rej["reason"] == "span_too_long"
    assert rej["detail"] == "a span is 11 target tokens; format.rlbf_max_x is 10"


def test_max_x_beyond_the_taxonomy_fails_the_config():
    with pytest.raises(ValueError, match="rlbf_max_x 129 exceeds the 128"):
        fmt.Config(rlbf_max_x=129)


def test_render_takes_back_n_tokens_and_needs_the_tokenizer(tok):
    turn = "Tea is green. Bad.[CATEGORY-HATE][BACKTRACK_BY_3] Fine."
    # " Bad." is " ", "B"... : take back exactly its tokens
    n = len(tok(" Bad.", add_special_tokens=False)["input_ids"])
    turn = turn.replace("[BACKTRACK_BY_3]", TAX.backtrack_by(n))
    assert render(turn, strict=True, tokenizer=tok) == "Tea is green. Fine."
    with pytest.raises(RenderError, match="pass tokenizer="):
        render(turn)
    one_more = turn.replace(TAX.backtrack_by(n), TAX.backtrack_by(n + 1))
    assert render(one_more, tokenizer=tok) == "Tea is green Fine."  # one token more: the "."


@pytest.mark.parametrize(
    "turn",
    [
        "Tea.[CATEGORY-HATE]",  # category with no take-back
        "Tea.[CATEGORY-HATE] more[BACKTRACK_BY_1]",  # text between the two
        "Tea.[BACKTRACK_BY_1]",  # take-back with no category
        "Tea.[CATEGORY-HATE][BACKTRACK_BY_128]",  # more tokens than are visible
        "Tea. Bad.[BACKTRACK-HATE]Bad.[CATEGORY-HATE][BACKTRACK_BY_1][REPLACE]",  # inside bsafe
    ],
)
def test_strict_render_rejects_malformed_rlbf_sequences(tok, turn):
    with pytest.raises(RenderError):
        render(turn, strict=True, tokenizer=tok)


def test_look_alikes_of_the_rlbf_tokens_are_neutralised():
    text, n = taxonomy.neutralise("a [backtrack_by_5] b [ CATEGORY-HATE ] c [BACKTRACK_BY_300]")
    assert n == 3 and "[" not in text


def _stream_pieces(row, tok):
    """The assistant turn as the trained model emits it: the trainer's own token ids, each
    decoded on its own (control tokens are single special tokens)."""
    t = type(tok).from_pretrained(tok.name_or_path)
    tokens.add_control_tokens(t, TAX.rlbf_tokens)
    enc = Encoder(t, 4096, tokens.control_tokens(TAX.rlbf_tokens))
    ids = [i for s in row["segments"] for i in _segment_ids(enc, s)]
    return [t.decode([i]) for i in ids], enc, t


def _segment_ids(enc, seg):
    return [enc.control[seg["text"]]] if seg["role"] == "control" else enc.text(seg["text"])


def test_streaming_one_token_at_a_time_gives_the_same_text_and_never_shows_the_span(
    tiny_model_dir, tok
):
    (row,) = one_violation(tiny_model_dir)["rlbf"].to_pylist()
    pieces, _, _ = _stream_pieces(row, tok)
    assert "".join(pieces) == row["completion"][0]["content"]
    # hold = the largest take-back this row uses: every text it deletes is still held back
    for hold in (None, 11):
        stream = StreamRenderer(tokenizer=tok, hold=hold)
        shown = [stream.feed(p) for p in pieces]
        assert stream.finish() == row["visible"] == render(row["completion"], tokenizer=tok)
        assert all(row["visible"].startswith(s) for s in shown)
        assert not any("idiot" in s for s in shown)
    # without holding, the span is shown until the take-back deletes it (as BSAFE's copy is)
    stream = StreamRenderer(tokenizer=tok, hold=0)
    shown = [stream.feed(p) for p in pieces]
    assert any("idiot" in s for s in shown) and stream.finish() == row["visible"]


def test_the_trainer_puts_exactly_x_untrained_tokens_before_the_category_token(tiny_model_dir, tok):
    (row,) = one_violation(tiny_model_dir)["rlbf"].to_pylist()
    _, enc, t = _stream_pieces(row, tok)
    doc = enc.encode(row, "rlbf")
    category = t.convert_tokens_to_ids("[CATEGORY-HARASSMENT]")
    by = t.convert_tokens_to_ids("[BACKTRACK_BY_11]")
    at = doc.ids.index(category)
    assert doc.ids[at + 1] == by
    assert doc.ids[at - 11 : at] == enc.text(" " + SPAN)  # the X tokens it takes back
    assert not any(doc.trained[:at])  # prompt, part1 and the span are context
    assert all(doc.trained[at:])  # category, take-back, continuation, end of turn


def test_an_rlbf_corpus_trained_with_another_tokenizer_is_recounted(tiny_model_dir, tmp_path):
    # The format stage counts n in its target tokenizer (meta.tokenizer: the tiny BPE); training
    # with a corpus BPE instead re-counts n in the trained tokenizer by the decoder's rule, so the
    # trained model's take-back removes exactly the span (issue 21 item 2).
    from trainer_fixtures import write_config

    from trainer.config import TrainConfig
    from trainer.train import train

    (row,) = one_violation(tiny_model_dir)["rlbf"].to_pylist()
    assert row["meta"]["tokenizer"] == str(tiny_model_dir)
    assert "[BACKTRACK_BY_11]" in row["completion"][0]["content"]
    write_config(tmp_path / "data", "rlbf", "train", [row] * 4)
    cfg = TrainConfig(
        model="random:tiny", tokenizer="corpus:1000", configs={"rlbf": 1.0}, steps=1, batch_size=2,
        eval_rows=0,
    )  # fmt: skip
    lines: list[str] = []
    final = train(cfg, tmp_path / "data", tmp_path / "out", log=lines.append)
    trained = tokens.load_tokenizer(str(final))
    # n by hand: the trained tokenizer's tokens of the visible text that lie in the span
    part1 = "Tea is green."
    spans = trained(part1 + " " + SPAN, add_special_tokens=False, return_offsets_mapping=True)
    ends = [b for _, b in spans["offset_mapping"]]
    assert len(part1) in ends  # a token ends where the span starts
    n = sum(1 for b in ends if b > len(part1))
    assert n != 11, n
    assert any("n changed in 4 of 4 rows" in ln and str(tiny_model_dir) in ln for ln in lines)
    enc = Encoder(trained, 512, tokens.control_tokens(TAX.rlbf_tokens))
    doc = enc.encode(row, "rlbf")
    at = doc.ids.index(trained.convert_tokens_to_ids("[CATEGORY-HARASSMENT]"))
    assert doc.ids[at + 1] == trained.convert_tokens_to_ids(TAX.backtrack_by(n))
    trained_turn = row["completion"][0]["content"].replace("[BACKTRACK_BY_11]", TAX.backtrack_by(n))
    assert render(trained_turn, strict=True, tokenizer=trained) == row["visible"]


def test_an_rlbf_span_too_long_in_the_trained_tokenizer_is_dropped_with_a_reason(tok):
    t = type(tok).from_pretrained(tok.name_or_path)
    tokens.add_control_tokens(t, TAX.rlbf_tokens)
    enc = Encoder(t, 1 << 20, tokens.control_tokens(TAX.rlbf_tokens))
    span = " " + " ".join(["zq"] * 80)  # 160 tokens or more in the tiny BPE
    segments = [
        {"text": "Tea is green.", "role": "text", "train": False},
        {"text": span, "role": "harmful", "train": False},
        {"text": "[CATEGORY-HATE]", "role": "control", "train": True},
        {"text": "[BACKTRACK_BY_5]", "role": "control", "train": True},
        {"text": " Fine.", "role": "text", "train": True},
    ]
    assert len(enc.text(span)) > TAX.backtrack_by_max
    r = {"id": "x", "kind": "rlbf", "prompt": [{"role": "user", "content": "Hi"}]}
    assert enc.encode({**r, "segments": segments}, "rlbf") == "span_too_long"
    no_span = [segments[0], *segments[2:]]
    assert enc.encode({**r, "segments": no_span}, "rlbf") == "take_back_without_span"

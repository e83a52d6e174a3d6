"""Corpus tolerance and tokenisation details (issue 17): a `meta` of another shape, control
tokens the taxonomy does not list, a space on the trained side of a harmful span, decision-point
weights, the corpus tokenizer and the saved generation config."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
from trainer_fixtures import corpus, one_thread, recovery, row, write_config

from pipeline import records
from trainer import tokens
from trainer.config import TrainConfig
from trainer.data import open_folder
from trainer.encode import Encoder
from trainer.train import train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def tok(control_tok):
    return control_tok


def _quiet(_: str) -> None:
    pass


def test_a_meta_of_another_shape_trains_and_still_redraws(tmp_path, tiny_model_dir, tok):
    # Another tool's corpus: meta has extra fields and other integer widths; the trainer reads
    # only the fields it needs (harmful, k_max, h_tokens).
    rows = [recovery(random.Random(i)) for i in range(6)]
    meta = pa.struct(
        [
            ("harmful", pa.string()),
            ("k_max", pa.int32()),
            ("h_tokens", pa.int32()),
            ("judge", pa.string()),
            ("scores", pa.list_(pa.float32())),
        ]
    )
    for r in rows:
        r["meta"] = {**{k: r["meta"][k] for k in ("harmful", "k_max", "h_tokens")}, "judge": "x"}
    schema = pa.schema([f if f.name != "meta" else pa.field("meta", meta) for f in records.SFT])
    write_config(tmp_path, "recovery", "train", rows, schema)
    (src,) = open_folder(tmp_path, {"recovery": 1.0})
    cfg = TrainConfig(model=str(tiny_model_dir), configs={"recovery": 1.0}, steps=2, eval_rows=0)
    train(cfg, tmp_path, tmp_path / "out", log=_quiet)
    enc = Encoder(tok, 512, tokens.control_tokens())
    from trainer.data import _file_rows

    got = next(_file_rows(src.train))
    assert set(got["meta"]) == {"harmful", "k_max", "h_tokens"}
    assert {len(enc.redrawn(got, 0, e)) for e in range(20)} == {1, 2}  # k = 0 and k > 0


def test_a_corpus_control_token_outside_the_taxonomy_is_added_and_said(tmp_path, tiny_model_dir):
    segs = [
        ("Your address is", "harmful", False),
        ("[BACKTRACK-PRIVACY_VIOLATION]", "control", True),
        ("Your address is", "copy", True),
        ("[REPLACE]", "control", True),
        ("I won't share that.", "replacement", True),
    ]
    write_config(tmp_path, "bsafe", "train", [row("bsafe", f"Where {i}?", segs) for i in range(4)])
    lines: list[str] = []
    cfg = TrainConfig(model=str(tiny_model_dir), configs={"bsafe": 1.0}, steps=1, eval_rows=0)
    final = train(cfg, tmp_path, tmp_path / "out", log=lines.append)
    assert any("[BACKTRACK-PRIVACY_VIOLATION]" in ln and "added" in ln for ln in lines)
    (record,) = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert record["dropped"] == 0 and record["rows"] == {"bsafe": 4}
    saved = tokens.load_tokenizer(str(final))
    assert "[BACKTRACK-PRIVACY_VIOLATION]" in saved.all_special_tokens


def test_a_space_on_the_trained_side_never_becomes_a_trained_lone_space(tok):
    enc = Encoder(tok, 512, tokens.control_tokens())
    span = "Such idiots are filthy scum."
    tail = [("[BACKTRACK-HATE]", "control", True), ("Sorry.", "replacement", True)]
    theirs = enc.encode(
        row("bsafe", "Hi", [("Tea is green. ", "text", True), (span, "harmful", False), *tail]), "b"
    )
    ours = enc.encode(
        row(
            "bsafe", "Hi", [("Tea is green.", "text", True), (" " + span, "harmful", False), *tail]
        ),
        "b",
    )
    assert theirs.ids == ours.ids and theirs.trained == ours.trained
    start = theirs.prompt_len
    pieces = [tok.decode([i]) for i in theirs.ids[start:]]
    flags = theirs.trained[start:]
    context = "".join(p for p, f in zip(pieces, flags, strict=True) if not f)
    assert context == " " + span  # the space goes with the span: no lone " " is trained
    cut = flags.index(False)  # where the harmful span starts
    assert not (pieces[cut - 1].isspace() and flags[cut - 1])


def test_decision_points_weigh_control_tokens_and_sentence_starts(tok):
    enc = Encoder(tok, 512, tokens.control_tokens(), decision_weight=4.0)
    r = row(
        "reset",
        "Hi",
        [
            ("Tea is green. It grows.", "safe", True),
            ("[RESET]", "control", True),
            ("No.", "safe", True),
        ],
    )
    doc = enc.encode(r, "reset")
    body = list(zip(doc.ids[doc.prompt_len :], doc.weights[doc.prompt_len :], strict=True))
    heavy = [tok.decode([i]) for i, w in body if w == 4.0]
    # after "green." and the control token; "No" after [RESET] is no decision (the control token
    # was), though "grows." before [RESET] ends a sentence (issue 21 item 6)
    assert heavy == [tok.decode(enc.text(" It")[:1]), "[RESET]"]
    assert sum(w == 1.0 for _, w in body) == len(body) - 2
    assert enc.encode(r, "reset").weights == doc.weights
    assert set(Encoder(tok, 512, tokens.control_tokens()).encode(r, "reset").weights) == {1.0}


def _heavy(enc, tok, segments) -> list[str]:
    doc = enc.encode(row("bsafe", "Hi", segments), "bsafe")
    start = doc.prompt_len
    return [
        tok.decode([i])
        for i, w in zip(doc.ids[start:], doc.weights[start:], strict=True)
        if w == enc.decision_weight
    ]


def test_decision_points_are_the_sentence_starts_of_pipeline_text(tok):
    # One sentence definition (pipeline/text.py, the guard's): "3.5" and "e.g." end no sentence,
    # a line break ends one, and the text right after a control token is no decision point.
    enc = Encoder(tok, 512, tokens.control_tokens(), decision_weight=4.0)

    def first(s: str) -> str:  # the first token of `s` that is not whitespace alone
        return next(p for p in map(tok.decode, ([i] for i in enc.text(s))) if p.strip())

    assert _heavy(enc, tok, [("It costs 3.5 euros, e.g. today. Buy it.", "text", True)]) == [
        first(" Buy")
    ]
    assert _heavy(enc, tok, [("A list:\nFirst item", "text", True)]) == [first("First")]
    span = "Such idiots are filthy scum."
    heavy = _heavy(
        enc,
        tok,
        [
            ("Tea is green.", "text", True),
            (" " + span, "harmful", False),
            ("[BACKTRACK-HATE]", "control", True),
            (span, "copy", True),
            ("[REPLACE]", "control", True),
            ("Some people disagree. Fine.", "replacement", True),
        ],
    )
    # " Such" starts a sentence (a backtrack could come instead); neither "Such" of the copy nor
    # "Some" right after a control token is one; " Fine" is
    assert heavy == [first(" Such"), "[BACKTRACK-HATE]", "[REPLACE]", first(" Fine")]


def test_corpus_tokenizer_and_generation_stops(tmp_path):
    folder = corpus(tmp_path / "data", {"bsafe": 20, "utility": 20}, validation=0)
    cfg = TrainConfig(model="random:tiny", tokenizer="corpus:400", steps=2, eval_rows=0)
    final = train(cfg, folder, tmp_path / "out", log=_quiet)
    tok = tokens.load_tokenizer(str(final))
    assert len(tok) <= 400 and set(tokens.control_tokens()) <= set(tok.all_special_tokens)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    stops = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(stops) == sorted({tok.eos_token_id, eot})
    with pytest.raises(ValueError, match="corpus:<N> needs N >= 300"):
        TrainConfig(tokenizer="corpus:20")

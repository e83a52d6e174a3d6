"""Trainer input: tokenisation and labels from segments, control-token privilege, truncation,
recovery k redraws, packing, and a bad dataset folder failing before any training."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from trainer_fixtures import REFUSAL, corpus, one_thread, recovery, row, write_config

from pipeline import records
from trainer import tokens
from trainer.batching import IGNORE, collate, plan
from trainer.config import TrainConfig
from trainer.data import DataError, Position, open_folder, train_batches
from trainer.encode import Doc, Encoder
from trainer.objectives import Heads, Objective, logits_fn
from trainer.train import _hidden, train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = tokens.load_tokenizer(str(tiny_model_dir))
    tokens.add_control_tokens(t)
    return t


@pytest.fixture(scope="module")
def enc(tok):
    return Encoder(tok, 512, tokens.control_tokens())


def _row(user="Hi", segs=(("Hello there.", "text", True),)):
    return row("utility", user, list(segs))


def test_gemma_turn_format_and_labels(enc, tok):
    r = _row(
        segs=[("Bad words", "harmful", False), ("[RESET]", "control", True), ("No.", "safe", True)]
    )
    doc = enc.encode(r, "reset")
    text = tok.decode(doc.ids)
    assert text == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        "Bad words[RESET]No.<end_of_turn>"
    )
    trained = tok.decode([i for i, f in zip(doc.ids, doc.trained, strict=True) if f])
    assert trained == "[RESET]No.<end_of_turn>"  # the unsafe prefix is context only
    assert doc.ids[-1] == tok.convert_tokens_to_ids("<end_of_turn>")


def test_literal_control_string_in_user_text_is_not_the_token(enc, tok):
    r = _row(
        user="Please print [RESET] and <end_of_turn> and [BACKTRACK-HATE]",
        segs=[("I typed [RESET] too.", "text", True)],
    )
    doc = enc.encode(r, "utility")
    special = {tok.convert_tokens_to_ids(t) for t in tokens.control_tokens()}
    assert not special.intersection(doc.ids)
    assert doc.ids.count(tok.convert_tokens_to_ids("<end_of_turn>")) == 2  # the template's own
    assert "[RESET]" in tok.decode(doc.ids)


def test_control_segment_maps_to_its_id_and_unknown_is_dropped(enc, tok):
    doc = enc.encode(_row(segs=[("x", "harmful", False), ("[RESET]", "control", True)]), "reset")
    assert tok.convert_tokens_to_ids("[RESET]") in doc.ids
    bad = _row(segs=[("[UNDO]", "control", True), ("ok", "text", True)])
    assert enc.encode(bad, "bsafe") == "unknown_control_token"


def test_truncation_never_leaves_a_row_without_trained_tokens(tok):
    short = Encoder(tok, 24, tokens.control_tokens())
    long_context = "The quick brown fox jumps over the lazy dog. " * 6
    r = _row(segs=[(long_context, "harmful", False), ("[RESET]", "control", True)])
    assert short.encode(r, "reset") == "truncated_all_trained"
    kept = short.encode(_row(segs=[(long_context, "text", True)]), "utility")
    assert len(kept.ids) == 24 and any(kept.trained[1:])
    assert short.encode(_row(segs=[("x", "harmful", False)]), "reset") == "no_trained_tokens"


def test_recovery_k_redraw_follows_qi_and_is_deterministic(enc, tok):
    rng = random.Random(0)
    r = recovery(rng)
    h = enc.text(r["meta"]["harmful"])
    head, _ = enc.scaffold(r["prompt"])

    def k_of(doc: Doc) -> int:
        return doc.trained.index(True, len(head)) - len(head)

    ks = []
    for epoch in range(400):
        doc = enc.encode(r, "recovery", redraw=(7, epoch))
        k = k_of(doc)
        assert doc.ids[len(head) : len(head) + k] == h[:k]  # joined at the id level
        assert all(doc.trained[len(head) + k :])
        refusal = tok.decode(doc.ids[len(head) + k :])
        assert refusal == (" " if k else "") + REFUSAL + "<end_of_turn>"
        ks.append(k)
    assert 0.4 < ks.count(0) / len(ks) < 0.6
    assert set(ks) - {0} == set(range(1, min(100, len(h)) + 1))
    assert ks == [k_of(enc.encode(r, "recovery", redraw=(7, e))) for e in range(400)]
    published = enc.encode(r, "recovery")  # no redraw: the row's own prefix
    assert tok.decode(published.ids).count(r["segments"][0]["text"] + " " + REFUSAL) == 1


def test_packed_equals_unpacked_loss(tiny_model_dir, enc):
    model, _ = tokens.load_checkpoint(tiny_model_dir)
    model.resize_token_embeddings(len(enc.tok))
    rng = random.Random(1)
    from trainer_fixtures import MAKERS

    docs = [enc.encode(MAKERS[k](rng), k) for k in ["bsafe", "reset", "utility", "recovery"] * 3]
    ce = Objective("sft", TrainConfig(), [])
    heads = Heads(logits_fn(model))

    def loss(batches):
        total = n = 0
        for b in batches:
            b = collate(b, enc.tok.pad_token_id)
            total += ce(_hidden(model.get_decoder(), b), None, b, heads).item()
            n += b.n_trained
        return total / n

    packed = plan(docs, 2, 256, True, random.Random(0))
    assert any(len(r) > 1 for b in packed for r in b)
    unpacked = plan(docs, 3, 256, False, random.Random(0))
    with torch.no_grad():
        assert loss(packed) == pytest.approx(loss(unpacked), rel=1e-5)


def test_collate_positions_and_no_cross_document_label():
    a, b = Doc([1, 2, 3], [False, True, True], "x"), Doc([4, 5], [False, True], "x")
    batch = collate([[a, b]], pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE]]  # 3 never predicts 4
    assert batch.trained_index.tolist() == [[1, 2, 0, 1, 0]]
    assert batch.attention_mask is None and batch.n_trained == 3


def test_stream_is_deterministic_and_resumes_mid_epoch(tmp_path, enc):
    folder = corpus(tmp_path, {"bsafe": 30, "utility": 20}, validation=0)
    sources = open_folder(folder, {"bsafe": 1.0, "utility": 2.0})
    assert [s.per_epoch for s in sources] == [30, 40]
    cfg = TrainConfig(batch_size=2, buffer_rows=16, shuffle_buffer=8, pack=False)

    def take(start, n):
        it = train_batches(sources, enc, cfg, 3, start, Counter())
        return [next(it) for _ in range(n)]

    full = take(Position(), 60)  # crosses into the second epoch
    assert {p.epoch for p, _ in full} == {0, 1}
    for cut in (5, 37):
        resumed = take(full[cut - 1][0], 60 - cut)
        for (_, x), (_, y) in zip(full[cut:], resumed, strict=True):
            assert torch.equal(x.input_ids, y.input_ids)


def _bad(tmp_path: Path, case: str) -> Path:
    folder = corpus(tmp_path, {"bsafe": 4}, validation=0)
    if case == "schema":
        schema = pa.schema([f for f in records.SFT if f.name != "segments"])
        write_config(folder, "mixture", "train", [{"id": "a"}], schema)
    if case == "untrainable":
        rows = [_row(segs=[("only context", "harmful", False)])]
        write_config(folder, "mixture", "train", rows)
    return folder


@pytest.mark.parametrize(
    "case, configs, message",
    [
        ("missing", {"reset": 1.0}, "config 'reset' has no train-*.parquet"),
        ("schema", {"mixture": 1.0}, "has no column 'segments'"),
        ("untrainable", {"mixture": 1.0}, "has no segment with train=true"),
        ("missing", {"preference": 1.0}, "trl.DPOTrainer"),
    ],
)
def test_bad_folder_fails_before_training(tmp_path, case, configs, message):
    folder = _bad(tmp_path, case)
    cfg = TrainConfig(model="random:nonexistent-size", configs=configs)
    with pytest.raises(DataError, match=message.replace("*", r"\*").replace(".", r"\.")):
        train(cfg, folder, tmp_path / "out")  # the model would fail to load: data is checked first
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_wrong_column_type_is_named(tmp_path):
    folder = corpus(tmp_path, {"bsafe": 4}, validation=0)
    path = folder / "data" / "bsafe" / "train-00000-of-00001.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("meta"), "meta", pa.array(["x"] * 4))
    pq.write_table(table, path)
    with pytest.raises(DataError, match="column 'meta' is string, expected struct"):
        open_folder(folder, {"bsafe": 1.0})


# Gemma's own template, trimmed to user/model turns (the real one also folds in a system turn).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
)


def test_chat_template_is_used_and_matches_the_turn_format(tiny_model_dir, enc):
    templated = tokens.load_tokenizer(str(tiny_model_dir))
    tokens.add_control_tokens(templated)
    templated.chat_template = GEMMA_TEMPLATE.replace("<start_of_turn>", "<start_of_turn> ")
    with_template = Encoder(templated, 512, tokens.control_tokens())
    r = _row(user="Say [RESET]", segs=[("x", "harmful", False), ("[RESET]", "control", True)])
    spaced = with_template.encode(r, "reset")
    assert templated.decode(spaced.ids).startswith("<bos><start_of_turn> user\nSay [RESET]")
    templated.chat_template = GEMMA_TEMPLATE
    assert with_template.encode(r, "reset") == enc.encode(r, "reset")


def test_rows_truncated_away_are_counted_and_all_dropped_fails(tmp_path, tok):
    folder = corpus(tmp_path, {"reset": 6, "utility": 6}, validation=0)
    sources = open_folder(folder, {"mixture": 1.0})
    cfg = TrainConfig(batch_size=2, pack=False)
    enc = Encoder(tok, 30, tokens.control_tokens())  # reset rows: the [RESET] lies past 30
    dropped = Counter()
    it = train_batches(sources, enc, cfg, 0, Position(), dropped)
    next(it)
    assert dropped == Counter({"mixture:truncated_all_trained": 6})
    with pytest.raises(DataError, match="every row of epoch 0 was dropped"):
        next(train_batches(sources, Encoder(tok, 8, ()), cfg, 0, Position(), Counter()))

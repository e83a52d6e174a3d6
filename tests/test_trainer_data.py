"""Trainer input: tokenisation and labels from segments, control-token privilege, truncation,
recovery k redraws, packing, and a bad dataset folder failing before any training."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from trainer_fixtures import corpus, one_thread, row, write_config

from pipeline import records
from trainer import tokens
from trainer.batching import IGNORE, collate, plan
from trainer.config import TrainConfig
from trainer.data import DataError, Position, open_folder, train_batches, train_steps
from trainer.encode import Doc, Encoder
from trainer.objectives import Heads, Objective, logits_fn
from trainer.train import _hidden, train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def tok(control_tok):
    return control_tok


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
    assert short.encode(r, "reset") == "edits_too_long"  # its edit cannot fit: dropped, named
    kept = short.encode(_row(segs=[(long_context, "text", True)]), "utility")
    assert len(kept.ids) == 24 and any(kept.trained[1:]) and kept.cut > 0  # the front is kept
    assert short.encode(_row(segs=[("x", "harmful", False)]), "reset") == "no_trained_tokens"


def test_a_long_bsafe_row_keeps_its_edit(tok):
    benign = "The quick brown fox jumps over the lazy dog. " * 8
    span = " Such idiots are filthy scum."
    segs = [
        (benign, "text", True),
        (span, "harmful", False),
        ("[BACKTRACK-HATE]", "control", True),
        (span, "copy", True),
        ("[REPLACE]", "control", True),
        (" Some people disagree.", "replacement", True),
        (" The end.", "text", True),
    ]
    r = row("bsafe", "Hi", segs)
    full = Encoder(tok, 4096, tokens.control_tokens()).encode(r, "bsafe")
    enc = Encoder(tok, len(full.ids) - 40, tokens.control_tokens())
    doc = enc.encode(r, "bsafe")
    assert len(doc.ids) == len(full.ids) - 40 and doc.cut == 40
    text = tok.decode(doc.ids)
    edit = (
        span + "[BACKTRACK-HATE]" + span + "[REPLACE] Some people disagree. The end.<end_of_turn>"
    )
    assert text.endswith(edit)  # the edit and everything after it are whole
    assert text.startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert doc.ids[: doc.prompt_len] == full.ids[: full.prompt_len]  # the prompt is whole too
    assert (
        tok.decode([i for i, f in zip(doc.ids, doc.trained, strict=True) if not f]).count(span) == 1
    )  # the harmful span is still context only
    assert enc.encode(r, "bsafe") == doc
    tight = Encoder(tok, full.prompt_len + 20, tokens.control_tokens())
    assert tight.encode(r, "bsafe") == "edits_too_long"


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
        return [(p, b) for p, _, b in (next(it) for _ in range(n))]

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
    with pytest.raises(DataError, match="column 'meta' is string, not a struct"):
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
    # reset rows lose their edit: dropped, named; utility rows keep their front: cut, counted
    # (or dropped when even their first trained token lies past 30)
    assert dropped["mixture:edits_too_long"] == 6
    assert dropped["mixture:cut_to_max_length"] + dropped["mixture:truncated_all_trained"] == 6
    with pytest.raises(DataError, match="every row of epoch 0 was dropped"):
        next(train_batches(sources, Encoder(tok, 8, ()), cfg, 0, Position(), Counter()))


def test_per_step_takes_the_requested_rows_of_each_component_every_step(tmp_path, enc):
    # 1 recovery : 4 anchor (Qi et al.'s 16 + 64, scaled down) in a wider mixture: every step
    # holds exactly the request, bsafe is left out, and a resumed stream continues identically.
    folder = corpus(tmp_path, {"recovery": 9, "anchor": 30, "bsafe": 20}, validation=0)
    sources = open_folder(folder, {"mixture": 1.0})
    cfg = TrainConfig(per_step={"recovery": 2, "anchor": 8}, batch_size=2, shuffle_buffer=8)
    counts = Counter()
    it = train_steps(sources, enc, cfg, 0, Position(), counts)
    steps = [next(it) for _ in range(12)]
    for s in steps:
        assert dict(s.rows) == {"recovery": 2, "anchor": 8}
        assert sum(b.n_trained for b in s.batches) == sum(s.tokens.values())
    assert steps[-1].position.taken == {"recovery": 24, "anchor": 96}
    assert steps[-1].position.epoch == 2  # recovery went round its 9 rows twice
    resumed = train_steps(sources, enc, cfg, 0, steps[5].position, Counter())
    for s, r in zip(steps[6:], resumed, strict=False):
        assert [b.input_ids.tolist() for b in s.batches] == [
            b.input_ids.tolist() for b in r.batches
        ]


def test_per_step_naming_a_component_the_data_lacks_fails_before_training(tmp_path):
    folder = corpus(tmp_path, {"recovery": 4, "utility": 4}, validation=0)
    cfg = TrainConfig(model="random:nonexistent-size", per_step={"recovery": 1, "anchor": 4})
    with pytest.raises(DataError, match=r"per_step names \['anchor'\]"):
        train(cfg, folder, tmp_path / "out")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(tiny_model_dir, attn):
    # transformers >= 4.56 (the floor in pyproject.toml) isolates packed documents from
    # position_ids alone; 4.52 did not. Changing document A must leave B's hidden states as
    # they are, and B's must equal B run alone.
    model, _ = tokens.load_checkpoint(tiny_model_dir, attn)
    model.eval()
    b = Doc(list(range(40, 60)), [False] + [True] * 19, "x")

    def hidden_of_b(a_ids: list[int]) -> torch.Tensor:
        a = Doc(a_ids, [False] + [True] * (len(a_ids) - 1), "x")
        batch = collate([[a, b]], pad_id=0)
        assert batch.attention_mask is None  # packed: positions alone separate the documents
        with torch.no_grad():
            return _hidden(model.get_decoder(), batch)[0, len(a_ids) :]

    alone = collate([[b]], pad_id=0)
    with torch.no_grad():
        solo = _hidden(model.get_decoder(), alone)[0]
    first, second = hidden_of_b(list(range(100, 130))), hidden_of_b(list(range(200, 230)))
    torch.testing.assert_close(first, second, rtol=0, atol=1e-5)
    torch.testing.assert_close(first, solo, rtol=0, atol=1e-5)


def test_data_error_is_one_class_for_the_trainer_and_eval():
    from pipeline import errors
    from stages import eval_data
    from trainer import data

    assert data.DataError is eval_data.DataError is errors.DataError
    assert issubclass(errors.DataError, errors.RetraceError)

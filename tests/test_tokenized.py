"""publish.tokenized: the `<config>-tok` twins equal the bundled trainer's encoding row for row,
load with `datasets`, and TRL's SFTTrainer trains on them with the bundled trainer's exact loss.

Inputs are blend's output on test_blend.py's self-written rows (as in test_publish.py); the
tokenizer and model are the tiny random Gemma of tests/tiny_gemma.py.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from test_blend import make_inputs
from test_blend import run as run_blend
from test_publish import do_publish, publish_inputs

from pipeline import card, records, taxonomy
from stages import publish_tokenized
from trainer import tokens
from trainer.batching import collate
from trainer.config import TrainConfig
from trainer.encode import Encoder
from trainer.objectives import Heads, Objective, logits_fn
from trainer.train import _hidden

SFT = [c for c in records.CONFIGS if c != "preference"]


@pytest.fixture(scope="module")
def folder(tiny_model_dir, tmp_path_factory) -> Path:
    sizes = {"bsafe": 8, "rlbf": 4, "reset": 6, "recovery": 6, "preference": 4, "utility": 10}
    inputs = publish_inputs(run_blend(make_inputs(sizes={**sizes, "anchor": 20})))
    out = tmp_path_factory.mktemp("tokenized")
    return do_publish(inputs, out, tokenized=[str(tiny_model_dir)])


RLBF = taxonomy.load().rlbf_tokens


def _encoder(tokenizer) -> Encoder:
    return Encoder(tokenizer, 1 << 30, tokens.control_tokens(RLBF))


def _load(folder: Path, config: str, split: str = "train"):
    return datasets.load_dataset(str(folder), config, split=split)


def test_every_sft_config_has_a_twin_equal_to_the_trainer_encoding(folder, tiny_model_dir):
    # The trainer's own tokenizer, built as `retrace train` builds it, not the saved one.
    trainer_tok = tokens.load_tokenizer(str(tiny_model_dir))
    tokens.add_control_tokens(trainer_tok, RLBF)
    enc = _encoder(trainer_tok)
    for config in SFT:
        for split in records.SPLITS:
            if not any((folder / "data" / config).glob(f"{split}-*.parquet")):
                continue
            rows = list(_load(folder, config, split))
            twins = list(_load(folder, f"{config}-tok", split))
            assert [t["id"] for t in twins] == [r["id"] for r in rows]  # the encoder kept all
            for row, twin in zip(rows, twins, strict=True):
                doc = enc.encode(row, config)
                assert twin["input_ids"] == doc.ids
                assert twin["completion_mask"] == [int(t) for t in doc.trained]
                assert twin["kind"] == row["kind"]
    assert _load(folder, "bsafe-tok").column_names == records.TOKENIZED.names
    # The saved tokenizer gives the same ids: control tokens at the same ids, as special tokens.
    saved = type(trainer_tok).from_pretrained(folder / "tokenizer")
    assert len(saved) == len(trainer_tok)
    assert tokens.control_ids(saved, RLBF) == tokens.control_ids(trainer_tok, RLBF)
    assert set(tokens.control_tokens(RLBF)) <= set(saved.all_special_tokens)


def test_masks_leave_harmful_spans_and_recovery_prefixes_untrained(folder):
    saved_dir = folder / "tokenizer"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved_dir)
    backtrack = tok.convert_tokens_to_ids("[BACKTRACK-HATE]")
    for twin, row in zip(_load(folder, "bsafe-tok"), _load(folder, "bsafe"), strict=True):
        at = twin["input_ids"].index(backtrack)
        harmful = next(s["text"] for s in row["segments"] if s["role"] == "harmful")
        n = len(tok(harmful, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        assert twin["completion_mask"][at - n : at] == [0] * n  # the span: context only
        assert twin["completion_mask"][at] == 1  # the backtrack token: trained
    enc = _encoder(tok)
    for twin, row in zip(_load(folder, "recovery-tok"), _load(folder, "recovery"), strict=True):
        # untrained: the prompt's turn markup and the published h≤k, nothing else
        head, _ = enc.scaffold(row["prompt"])
        prefix = "".join(s["text"] for s in row["segments"] if s["role"] == "harmful")
        untrained = len(head) + len(enc.text(prefix))
        assert twin["completion_mask"] == [0] * untrained + [1] * (
            len(twin["input_ids"]) - untrained
        )


def test_card_shows_the_trl_snippet_and_counts_the_twins(folder):
    text = (folder / "README.md").read_text()
    assert "completion_only_loss=True" in text and "resize_token_embeddings" in text
    assert 'subfolder="tokenizer"' in text
    tables = card.card_tables(folder)
    counted = {r["config"] for r in tables["counts"]}
    assert {f"{c}-tok" for c in SFT} <= counted
    # and the preference pairs per type (Zhang et al.'s two kinds)
    pairs = datasets.load_dataset(str(folder), "preference")
    by_type = {}
    for split in pairs:
        for meta in pairs[split]["meta"]:
            by_type[(meta["pair"], split)] = by_type.get((meta["pair"], split), 0) + 1
    assert {(r["pair"], r["split"]): int(r["rows"]) for r in tables["pairs"]} == by_type


def test_several_tokenizers_get_names_of_their_own():
    assert publish_tokenized.names(["embedded"]) == [("tok", "tokenizer")]
    assert publish_tokenized.names(["google/gemma-3-270m", "/m/Llama-3.2-1B"]) == [
        ("tok-gemma-3-270m", "tokenizer-gemma-3-270m"),
        ("tok-llama-3-2-1b", "tokenizer-llama-3-2-1b"),
    ]
    with pytest.raises(ValueError, match="share a name"):
        publish_tokenized.names(["a/x", "b/x"])


def test_trl_sft_loss_equals_the_bundled_trainer_loss_and_masked_positions_get_no_gradient(
    folder, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    train = _load(folder, "bsafe-tok")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        completion_only_loss=True,
        per_device_train_batch_size=len(train),  # one batch holds every row
        max_steps=1,
        max_length=None,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        save_strategy="no",
        learning_rate=1e-3,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))

    # TRL's loss (a fused cross-entropy: no logits), with the gradient at the last hidden states
    # kept; the final norm and output layer act per position, so position i has a gradient
    # exactly when its prediction is in the loss
    kept = {}

    def keep_hidden(_module, _inputs, outputs):
        outputs.last_hidden_state.retain_grad()  # any time before backward
        kept["hidden"] = outputs.last_hidden_state

    hook = model.get_decoder().register_forward_hook(keep_hidden)
    model.train()
    trl_loss = trainer.compute_loss(model, batch)
    hook.remove()
    trl_loss.backward()

    # The bundled trainer's sft loss on the same rows (its own encoding of the published rows)
    rows = list(_load(folder, "bsafe"))
    enc = _encoder(tok)
    docs = [enc.encode(r, "bsafe") for r in rows]
    b = collate([[d] for d in docs], tok.pad_token_id)
    with torch.no_grad():
        hidden = _hidden(model.get_decoder(), b)
        ours = (
            Objective("sft", TrainConfig(), tokens.control_ids(tok))(
                hidden, None, b, Heads(logits_fn(model))
            )
            / b.n_trained
        )
    assert trl_loss.item() == pytest.approx(ours.item(), rel=1e-5)
    assert int((batch["labels"][:, 1:] != -100).sum()) == b.n_trained

    # position i predicts token i+1: it has a gradient exactly where token i+1 is trained
    grad = kept["hidden"].grad.abs().sum(-1)  # [B, L]
    trained_next = torch.zeros_like(grad, dtype=torch.bool)
    trained_next[:, :-1] = batch["labels"][:, 1:] != -100
    assert torch.all(grad[~trained_next] == 0)
    assert torch.all(grad[trained_next] > 0)

    trainer.train()  # and TRL trains on it, one step
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("config", ["rlbf", "bsafe"])
def test_tok_ids_equal_a_retrace_trained_models_for_every_control_token(
    folder, tiny_model_dir, tmp_path, config
):
    # One order (trainer/tokens.py control_tokens): a model `retrace train` trained on the
    # published rows, rlbf's or not, numbers every control token it has as the -tok tokenizer does,
    # so continuing it on `<config>-tok` puts each token on its own embedding (issue 21 item 4).
    from transformers import AutoTokenizer

    from trainer.train import train

    cfg = TrainConfig(
        model=str(tiny_model_dir), configs={config: 1.0}, steps=1, batch_size=2, eval_rows=0
    )
    final = train(cfg, folder, tmp_path / "out", log=lambda _: None)
    trained = AutoTokenizer.from_pretrained(final)
    published = AutoTokenizer.from_pretrained(folder / "tokenizer")
    have = [t for t in taxonomy.load().all_tokens if t in trained.get_vocab()]
    assert {t: trained.convert_tokens_to_ids(t) for t in have} == {
        t: published.convert_tokens_to_ids(t) for t in have
    }
    assert set(tokens.control_tokens()) <= set(have)
    if config == "rlbf":
        assert set(RLBF) <= set(have)  # the corpus uses a few: the model gets all of RLBF's
    else:
        assert not set(RLBF) & set(have)  # a model not trained on rlbf keeps its vocabulary

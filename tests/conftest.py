"""Shared fixtures. Nothing here downloads: models and data are built or shipped in the repo."""

from __future__ import annotations

import os

# One thread everywhere (set before torch loads; subprocesses inherit it): two threads on this
# 2-core machine oversubscribe beside the suite's servers, and a float sum's order, which the thread
# count sets, moves the fluent fixture's weights and with them every pinned byte.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_gemma import build_fluent_tiny_gemma, build_tiny_gemma  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Gemma 3 model with a 600-token BPE tokenizer (see tiny_gemma.py)."""
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="session")
def fluent_model_dir(tmp_path_factory) -> Path:
    """The tiny model trained for a few seconds to write sentences and stop (see tiny_gemma.py)."""
    return build_fluent_tiny_gemma(tmp_path_factory.mktemp("fluent-gemma"))


@pytest.fixture(scope="session")
def control_model_dir(tmp_path_factory) -> Path:
    """The tiny Gemma with retrace's control tokens and a sliding window of 4 (decode_fixtures)."""
    from decode_fixtures import control_model

    return control_model(tmp_path_factory.mktemp("control-gemma"))


@pytest.fixture(scope="module")
def control_tok(tiny_model_dir):
    """The tiny model's tokenizer with the control tokens added, as the trainer adds them (one per
    module: tests may add more tokens to it)."""
    from trainer import tokens

    t = tokens.load_tokenizer(str(tiny_model_dir))
    tokens.add_control_tokens(t)
    return t


JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


@pytest.fixture(scope="session")
def detoxify_checkpoint(tmp_path_factory):
    """A random 1-layer BERT with a 15-word vocabulary in detoxify's checkpoint format
    ({config: {arch, dataset}, state_dict}) beside its HF config + tokenizer folder: detoxify's
    own loading code runs on it, offline. Returns the folder and the model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-detoxify")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "an", "idiot", "have"]
    words += ["a", "nice", "day", "the", "cat"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,  # a filter test's whole response fits
        num_labels=len(JIGSAW),
    )
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    arch = {
        "model_type": str(folder),
        "model_name": "BertForSequenceClassification",
        "tokenizer_name": "BertTokenizer",
        "num_classes": len(JIGSAW),
    }
    ckpt = {
        "config": {"arch": {"args": arch}, "dataset": {"args": {"classes": JIGSAW}}},
        "state_dict": model.state_dict(),
    }
    torch.save(ckpt, folder / "tiny.ckpt")
    return folder, model


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """torch may have been imported before the variables above were read (a plugin)."""
    import torch

    torch.set_num_threads(1)

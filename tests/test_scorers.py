"""Toxicity scorers: profanity-check for real, detoxify's own loading code on a tiny checkpoint
(conftest.py's `detoxify_checkpoint`)."""

from __future__ import annotations

import pytest
import torch

from pipeline.scorers import ScorerSpec, load_scorer


def test_profanity_check_flags_toxic_passes_benign():
    scorer = load_scorer(ScorerSpec())
    toxic, benign = scorer.score(
        ["You are a fucking idiot and I hate you.", "Have a lovely day at the park."]
    )
    assert scorer.labels == ("profanity",)
    assert toxic["profanity"] > 0.9 and benign["profanity"] < 0.2


def test_detoxify_loads_local_checkpoint_through_its_own_code(detoxify_checkpoint):
    folder, model = detoxify_checkpoint
    spec = ScorerSpec(
        kind="detoxify",
        checkpoint=str(folder / "tiny.ckpt"),
        huggingface_config_path=str(folder),
        batch_size=2,
    )
    scorer = load_scorer(spec)
    # detoxify renames the Jigsaw classes to its standard label names.
    assert scorer.labels == (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
    )
    texts = ["you are an idiot", "have a nice day", "the cat"]  # batches of 2, then 1
    got = scorer.score(texts)
    tok = scorer._model.tokenizer
    with torch.no_grad():
        expected = torch.sigmoid(model(**tok(texts, return_tensors="pt", padding=True)).logits)
    for row, probs in zip(got, expected.tolist(), strict=True):
        assert list(row) == list(scorer.labels)
        assert [row[label] for label in scorer.labels] == pytest.approx(probs, abs=1e-5)


def test_detoxify_without_checkpoint_offline_says_how_to_provide_it(tmp_path):
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty hub cache: nothing downloaded before
    try:
        with pytest.raises(FileNotFoundError, match="not available offline") as err:
            load_scorer(ScorerSpec(kind="detoxify", model_type="unbiased"))
    finally:
        torch.hub.set_dir(hub)
    message = str(err.value)
    assert "scorer.checkpoint" in message and "toxic_debiased" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scorer(ScorerSpec(kind="detoxify", checkpoint=str(tmp_path / "missing.ckpt")))

"""The trainer teaches *when* to backtrack: after `make train`-sized training (the train: section
of configs/default.yaml: a tiny random Gemma 3, a 2k corpus BPE, decision-point weight 4) on a
small synthetic corpus, a held-apart probe set (tests/probes/backtrack.yaml, written apart from the
corpus) gets backtracking after harmful sentences and not after benign ones, and [RESET] after
harmful answer prefixes and not after benign ones; the untrained twin does neither.

Measured here (2 shared cores, one thread): ~585k tokens, the test 40-106 s (218 s under a load
average of 16); at run seed 1, backtrack 0.146 after harmful vs 0.001 after benign, [RESET] 0.381
vs 0.002. One tiny run is a lottery over seeds: with issue 21's decision points (pipeline/text.py
sentences, none right after a control token) seeds 0-5 pass 2 of 6 (1 and 2), with the old ones 1
of 6 (0), which is why the seed is pinned (scripts/probe_trainer.py prints the figures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from trainer_fixtures import corpus, one_thread
from trainer_probes import measure, passes

from trainer import tokens
from trainer.config import TrainConfig
from trainer.encode import Encoder
from trainer.train import train

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
SIZES = {"bsafe": 400, "reset": 150, "plain": 100, "utility": 200}
SEED = 1  # see the module docstring


def make_train_config(**changes) -> TrainConfig:
    section = yaml.safe_load(DEFAULT.read_text())["train"]
    return TrainConfig.model_validate({**section, "eval_rows": 0, **changes})


def test_learns_when_to_backtrack_on_held_apart_probes(tmp_path):
    folder = corpus(tmp_path / "data", SIZES, validation=0)
    cfg = make_train_config(seed=SEED)
    final = train(cfg, folder, tmp_path / "out", log=lambda _: None)
    model, tok = tokens.load_checkpoint(final)
    trained = measure(model, Encoder(tok, 512, tokens.control_tokens()))
    assert passes(trained), trained
    # The untrained twin: the same start model (same seed, same corpus tokenizer), no steps.
    from trainer.data import corpus_text, open_folder

    sources = open_folder(folder, cfg.configs)
    twin, twin_tok = tokens.load_for_training(
        cfg.model, cfg.tokenizer, SEED, corpus_text=lambda: corpus_text(sources)
    )
    assert twin_tok.get_vocab() == tok.get_vocab()
    untrained = measure(twin, Encoder(twin_tok, 512, tokens.control_tokens()))
    assert not passes(untrained), untrained

"""Shared fixtures. Nothing here downloads: models and data are built or shipped in the repo."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_gemma import build_fluent_tiny_gemma, build_tiny_gemma


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

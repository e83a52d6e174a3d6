"""The vLLM decoder's mapping, through a stand-in `vllm` module (no GPU here): biases become
`logit_bias` on control ids, control tokens stay in the text, and a `drop` edit stops the request
at the control token and resubmits the cropped prefix."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest

from pipeline.backends import GeneratorSpec, load_generator
from pipeline.decode import DecodeConfig, Request, load_decoder
from pipeline.decode.vllm_decoder import BIAS_FLOOR, VllmDecoder

USER = [{"role": "user", "content": "Tell me about foxes."}]


@dataclass
class Completion:
    token_ids: list[int]


@dataclass
class RequestOutput:
    outputs: list[Completion]


def scripted_vllm(tokenizer, rounds):
    """A stand-in `vllm`: `LLM.generate` answers round k with `rounds[k]` (token ids per
    request), cut at the request's first stop token id as vLLM does; `calls` records prompts and
    SamplingParams kwargs per round."""
    calls: list[tuple[list[dict], list[dict]]] = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            pass

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, params, use_tqdm=True):
            calls.append((prompts, [p.kwargs for p in params]))
            out = []
            for tokens, p in zip(rounds[len(calls) - 1], params, strict=True):
                stops = set(p.kwargs["stop_token_ids"])
                cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
                out.append(RequestOutput([Completion(tokens[: min(cut, p.kwargs["max_tokens"])])]))
            return out

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module, calls


@pytest.fixture(scope="module")
def model_dir(control_model_dir):
    return control_model_dir


def test_drop_edit_stops_at_the_control_token_and_resubmits_the_cropped_prefix(
    model_dir, monkeypatch
):
    tok = load_generator(GeneratorSpec(model=str(model_dir))).tokenizer
    words = lambda s: tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
    vocab = tok.get_vocab()
    reset, hate, eot = vocab["[RESET]"], vocab["[BACKTRACK-HATE]"], vocab["<end_of_turn>"]
    first = words("Sure, here is how") + [reset] + words("never sent")
    second = words("I cannot help with that.") + [eot]
    module, calls = scripted_vllm(tok, [[first], [second]])
    monkeypatch.setitem(sys.modules, "vllm", module)
    gen = load_generator(GeneratorSpec(backend="vllm", model=str(model_dir)))
    cfg = DecodeConfig(
        context="drop", temperature=0.9, top_p=0.6, max_new_tokens=64,
        bias={"RESET": -5.0}, disable=("hate",),
    )  # fmt: skip
    dec = load_decoder(gen, cfg)
    assert isinstance(dec, VllmDecoder)
    [out] = dec.decode([Request(USER, seed=7)])

    assert out.visible == "I cannot help with that."
    assert [e.kind for e in out.events] == ["reset"]
    (p1, s1), (p2, s2) = calls
    prompt = dec.prompts.prompt(USER, "request 0")
    assert p1 == [{"prompt_token_ids": prompt}]
    assert p2 == [{"prompt_token_ids": prompt}]  # the reset cropped the turn back to the prompt
    params = s1[0]
    assert params["logit_bias"] == {reset: -5.0, hate: BIAS_FLOOR}
    assert params["skip_special_tokens"] is False
    assert set(dec.controls.tokens) <= set(params["stop_token_ids"])
    assert eot in params["stop_token_ids"]
    assert (params["temperature"], params["top_p"], params["top_k"]) == (0.9, 0.6, -1)
    assert params["max_tokens"] == 64
    assert s2[0]["max_tokens"] == 64 - len(words("Sure, here is how")) - 1
    assert params["seed"] != s2[0]["seed"]  # each round draws its own stream


def test_keep_is_one_request_per_turn(model_dir, monkeypatch):
    tok = load_generator(GeneratorSpec(model=str(model_dir))).tokenizer
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    vocab = tok.get_vocab()
    bt, rep, eot = vocab["[BACKTRACK-HATE]"], vocab["[REPLACE]"], vocab["<end_of_turn>"]
    turn = words("The fox bites.") + [bt] + words(" bites.") + [rep] + words(" naps.") + [eot]
    module, calls = scripted_vllm(tok, [[turn]])
    monkeypatch.setitem(sys.modules, "vllm", module)
    dec = load_decoder(load_generator(GeneratorSpec(backend="vllm", model=str(model_dir))),
                       DecodeConfig())  # fmt: skip
    [out] = dec.decode([Request(USER)])
    assert out.visible == "The fox naps." and len(calls) == 1
    assert calls[0][1][0]["logit_bias"] is None
    assert not set(dec.controls.tokens) & set(calls[0][1][0]["stop_token_ids"])

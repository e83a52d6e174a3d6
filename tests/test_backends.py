"""Generator backends: transformers on the tiny random Gemma, vLLM through a stand-in module.

vLLM cannot run on these CPU machines, so its adapter is tested at the boundary: a fake `vllm`
module records what the adapter passes to `LLM(...)`, `SamplingParams(...)` and `generate`, and
returns outputs shaped like vLLM's `RequestOutput`/`CompletionOutput`.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from pipeline.backends import (
    GeneratorSpec,
    NucleusSampler,
    SamplingParams,
    TransformersGenerator,
    VllmGenerator,
    load_generator,
)


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return load_generator(GeneratorSpec(model=str(tiny_model_dir), batch_size=3))


PROMPTS = ["The quick brown fox", "Here is a simple recipe", "Write a short poem about the sea"]


def test_format_chat_without_template_writes_gemma_turns(gen):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert gen.format_chat(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_prompt_gets_exactly_one_bos(gen):
    bos = gen.tokenizer.bos_token_id
    plain, templated = gen.encode_prompt("Hi"), gen.encode_prompt("<bos>Hi")
    assert plain == templated and plain[0] == bos and plain.count(bos) == 1
    eot = gen.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert gen.encode_prompt("<end_of_turn>")[1:] == [eot]  # special tokens stay single ids
    assert eot in gen.stop_ids and gen.tokenizer.eos_token_id in gen.stop_ids


def test_generate_shapes_counts_and_length_finish(gen):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, n=2)
    out = gen.generate(PROMPTS, params, seeds=[1, 2, 3])
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, gens in zip(PROMPTS, out, strict=True):
        for g in gens:
            assert g.prompt_tokens == len(gen.encode_prompt(prompt))
            assert 1 <= g.completion_tokens <= 5
            assert g.finish_reason == ("length" if g.completion_tokens == 5 else "stop")


def test_same_seeds_same_samples_other_seeds_differ(gen):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    first = gen.generate(PROMPTS, params, seeds=[1, 2, 3])
    assert gen.generate(PROMPTS, params, seeds=[1, 2, 3]) == first
    other = gen.generate(PROMPTS, params, seeds=[7, 8, 9])
    assert [g[0].text for g in other] != [g[0].text for g in first]
    # One batch of 3 requests: every row records the one batch seed that drew it.
    assert len({g[0].seed for g in first}) == 1


def test_seeds_must_match_prompts(gen):
    with pytest.raises(ValueError, match="3 prompts but 1 seeds"):
        gen.generate(PROMPTS, SamplingParams(), seeds=[1])


def test_generation_ends_at_end_of_turn_and_stop_strings(gen, monkeypatch):
    """Left padding in; a completion ends at its first stop token (counted) or stop string
    (generate pads the rest of that row, which is not counted), else runs to max_new_tokens."""
    tok = gen.tokenizer
    eot, pad = tok.convert_tokens_to_ids("<end_of_turn>"), gen.pad_id
    words = tok("fox jumps", add_special_tokens=False)["input_ids"]
    stop = tok(" STOP", add_special_tokens=False)["input_ids"]
    width = len(words) + len(stop) + 2
    tails = [
        [*words, eot] + [pad] * width,
        [*words, *stop] + [pad] * width,
        [*words] * width,
    ]
    seen = {}

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        seen.update(ids=input_ids, mask=attention_mask, kwargs=kwargs)
        return torch.cat([input_ids, torch.tensor([t[:max_new_tokens] for t in tails])], dim=1)

    monkeypatch.setattr(gen.model, "generate", fake_generate)
    params = SamplingParams(temperature=0.0, max_new_tokens=width, stop=("STOP",))
    at_eot, at_stop, at_length = gen.generate(
        ["Hi", "Hello", "The quick brown fox"], params, [0] * 3
    )
    assert seen["ids"][0].tolist()[0] == pad and seen["mask"][0].tolist()[0] == 0  # left padded
    assert seen["kwargs"]["do_sample"] is False and "stopping_criteria" in seen["kwargs"]
    assert at_eot[0].text == tok.decode(words) and at_eot[0].finish_reason == "stop"
    assert at_eot[0].completion_tokens == len(words) + 1
    assert (
        at_stop[0].text == tok.decode([*words, *stop]).split("STOP")[0]
        and at_stop[0].finish_reason == "stop"
    )
    assert at_stop[0].completion_tokens == len(words) + len(stop)
    assert at_length[0].finish_reason == "length" and at_length[0].completion_tokens == width


# --- vLLM through a stand-in ---------------------------------------------------------------


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int] = field(default_factory=list)


def fake_vllm(tokenizer, completions):
    """A stand-in `vllm` module; `calls` records what the adapter passed at the boundary."""
    calls: dict = {"sampling": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            calls["sampling"].append(kwargs)
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def get_tokenizer(self):
            return tokenizer

        def generate(self, requests, sampling, use_tqdm=True):
            calls["generate"] = (requests, sampling)
            return [FakeRequestOutput(c) for c in completions[: len(requests)]]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module, calls


def test_vllm_adapter_maps_params_outputs_and_seeds(gen, tiny_model_dir, monkeypatch):
    completions = [
        [FakeCompletion("A fine answer.<end_of_turn>", [5, 6, 7], "stop")],
        [
            FakeCompletion("Cut here STOP not this", [5] * 9, "stop"),
            FakeCompletion("", [], "abort"),
        ],
        [FakeCompletion("Runs on and on", [5] * 16, "length")],
    ]
    module, calls = fake_vllm(gen.tokenizer, completions)
    monkeypatch.setitem(sys.modules, "vllm", module)
    spec = GeneratorSpec(
        backend="vllm",
        model=str(tiny_model_dir),
        tensor_parallel_size=4,
        gpu_memory_utilization=0.8,
        max_model_len=4096,
    )
    vllm_gen = load_generator(spec)
    assert isinstance(vllm_gen, VllmGenerator)
    assert calls["llm"] == {
        "model": str(tiny_model_dir),
        "revision": None,
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16",
        "max_model_len": 4096,
    }
    params = SamplingParams(temperature=1.5, top_p=0.98, max_new_tokens=300, n=2, stop=("STOP",))
    out = vllm_gen.generate(PROMPTS, params, seeds=[11, 22, 33])

    requests, sampling = calls["generate"]
    assert requests == [{"prompt_token_ids": gen.encode_prompt(p)} for p in PROMPTS]
    assert [s.kwargs["seed"] for s in sampling] == [11, 22, 33]  # per request
    assert calls["sampling"][0] == {
        "n": 2,
        "temperature": 1.5,
        "top_p": 0.98,
        "top_k": -1,
        "max_tokens": 300,  # never vLLM's default of 16
        "seed": 11,
        "stop": ["STOP"],
        "skip_special_tokens": False,
    }
    assert [[g.text for g in gens] for gens in out] == [
        ["A fine answer."],
        ["Cut here ", ""],
        ["Runs on and on"],
    ]
    assert [[g.finish_reason for g in gens] for gens in out] == [
        ["stop"],
        ["stop", "length"],
        ["length"],
    ]
    assert [g.completion_tokens for g in out[1]] == [9, 0]
    assert [g.seed for g in out[1]] == [22, 22]
    assert out[2][0].prompt_tokens == len(gen.encode_prompt(PROMPTS[2]))


def test_vllm_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'retrace\[vllm\]'"):
        load_generator(GeneratorSpec(backend="vllm", model="google/gemma-2-27b-it"))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="backend"):
        GeneratorSpec(backend="llamacpp")


def test_fingerprint_covers_settings_and_model_identity(gen, tiny_model_dir):
    assert isinstance(gen, TransformersGenerator) and gen.model_id == str(tiny_model_dir)
    fp = gen.spec.fingerprint()
    assert fp["batch_size"] == 3  # batch composition changes transformers samples
    assert fp["identity"]["model"] == str(tiny_model_dir.resolve())
    assert len(fp["identity"]["files_sha256"]) == 16


# --- the sampler ----------------------------------------------------------------------------


def draws(sampler, scores, steps=2000):
    """Token ids drawn over `steps` calls; each call's row is 0 at one token, -inf elsewhere."""
    out = [sampler(None, scores) for _ in range(steps)]
    for row in out:
        assert ((row == 0).sum(-1) == 1).all() and torch.isinf(row).sum() == row.numel() - len(row)
    return torch.cat([row.argmax(-1) for row in out]).tolist()


def test_sampler_keeps_the_top_p_nucleus_with_its_proportions():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = draws(NucleusSampler(1.0, 0.7, 0, seed=1), probs.log())
    # Kept: tokens whose preceding mass is under 0.7, i.e. 0 (0.0) and 1 (0.5); not 2 (0.8).
    assert set(picks) == {0, 1}
    assert picks.count(0) / len(picks) == pytest.approx(0.5 / 0.8, abs=0.04)
    assert draws(NucleusSampler(1.0, 0.7, 0, seed=1), probs.log()) == picks  # same seed
    assert set(draws(NucleusSampler(1.0, 1.0, 1, seed=2), probs.log(), 50)) == {0}  # top_k=1


def test_sampler_widens_past_its_first_candidates_and_applies_temperature():
    flat = torch.zeros(2, 5000)  # uniform: 0.98 of the mass needs 4,900 candidates
    picks = draws(NucleusSampler(1.0, 0.98, 0, seed=3), flat, 300)
    assert max(picks) > 1024
    peaked = torch.tensor([[4.0, 0.0, 0.0]])  # T=1: token 0 has 0.96; T=100: about a third
    hot = draws(NucleusSampler(100.0, 1.0, 0, seed=4), peaked, 600)
    assert hot.count(0) / len(hot) == pytest.approx(1 / 3, abs=0.06)

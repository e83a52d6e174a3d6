"""Generator backends: transformers on the tiny random Gemma, vLLM through a stand-in module.

vLLM cannot run on these CPU machines, so its adapter is tested at the boundary: a fake `vllm`
module records what the adapter passes to `LLM(...)`, `SamplingParams(...)` and `generate`, and
returns outputs shaped like vLLM's `RequestOutput`/`CompletionOutput`.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LogitsProcessorList

from pipeline.backends import (
    GeneratorSpec,
    NucleusSampler,
    SamplingParams,
    TransformersGenerator,
    VllmGenerator,
    load_generator,
    request_seed,
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
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2)
    first = gen.generate(PROMPTS, params, seeds=[1, 2, 3])
    assert gen.generate(PROMPTS, params, seeds=[1, 2, 3]) == first
    other = gen.generate(PROMPTS, params, seeds=[7, 8, 9])
    assert [g[0].text for g in other] != [g[0].text for g in first]
    # Every request draws from its own stream: the prompt's seed, then one derived per sample.
    assert [[g.seed for g in gens] for gens in first] == [
        [s, request_seed(s, 1)] for s in (1, 2, 3)
    ]


def test_a_row_depends_only_on_its_own_prompt_and_seed(tiny_model_dir, gen):
    """Batched equals one by one, and a row does not change with its neighbours."""
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=2)
    together = gen.generate(PROMPTS, params, seeds=[1, 2, 3])  # batch 3: rows leave and join
    for size in (1, 8):
        other = load_generator(GeneratorSpec(model=str(tiny_model_dir), batch_size=size))
        assert other.generate(PROMPTS, params, seeds=[1, 2, 3]) == together
    assert gen.generate(PROMPTS[1:2], params, seeds=[2]) == together[1:2]
    assert gen.generate([PROMPTS[2], "Hi", PROMPTS[1]], params, [3, 5, 2])[2] == together[1]


def plain_generate(gen, prompts, params, seeds):
    """Reference: one padded `model.generate` batch, no row leaves until all stop, each row drawn
    from the same per-request stream as the backend's."""
    requests = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
    encoded = [gen.encode_prompt(prompts[i]) for i, _ in requests]
    width, pad = max(map(len, encoded)), gen.pad_id
    row_seeds = [request_seed(seeds[i], j) for i, j in requests]
    sampler = NucleusSampler(params.temperature, params.top_p, params.top_k, seed=row_seeds)
    out = gen.model.generate(
        input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in encoded]),
        attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded]),
        do_sample=False,
        logits_processor=LogitsProcessorList([sampler]),
        max_new_tokens=params.max_new_tokens,
        eos_token_id=sorted(gen.stop_ids),
        pad_token_id=pad,
    )
    texts = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in gen.stop_ids), len(row))
        texts.append(gen.tokenizer.decode(row[:end], skip_special_tokens=False))
    return texts, len(requests) * (out.shape[1] - width)


def test_finished_rows_leave_the_batch_and_rows_match_plain_generate(fluent_model_dir):
    """The same seeds give the same rows with and without finished-row removal, over a prompt
    longer than the sliding window (64 tokens) and prompts sharing a prefilled prefix."""
    fluent = load_generator(GeneratorSpec(model=str(fluent_model_dir), batch_size=2))
    shared = "Here is a simple recipe for a healthy breakfast with oats and fruit. The answer is"
    prompts = [
        " ".join(["Exercise, sleep and a balanced diet are good for your health."] * 6),
        f"{shared} The quick brown fox",
        f"{shared} Write a short poem",
        "The capital of France",
    ]
    assert len(fluent.encode_prompt(prompts[0])) > 64
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=2)
    before = copy.copy(fluent.stats)
    out = fluent.generate(prompts, params, seeds=[4, 5, 6, 7])
    stats = fluent.stats
    texts, generate_row_steps = plain_generate(fluent, prompts, params, [4, 5, 6, 7])
    eot = "<end_of_turn>"
    assert [g.text + (eot if g.finish_reason == "stop" else "") for r in out for g in r] == texts
    assert len({g.completion_tokens for r in out for g in r}) > 3  # rows end far apart
    tokens = stats.tokens - before.tokens
    assert tokens == sum(g.completion_tokens for r in out for g in r)
    assert stats.row_steps - before.row_steps == tokens < generate_row_steps  # none wasted
    # Two samples share a prefill, and the start two prompts share is prefilled once.
    lengths = [len(fluent.encode_prompt(p)) for p in prompts]
    shared_tokens = len(fluent.encode_prompt(shared))
    assert shared_tokens >= 16  # batching._MIN_SHARED
    assert stats.prefill_tokens - before.prefill_tokens <= sum(lengths) - shared_tokens + 1


def test_waiting_requests_take_the_slots_of_finished_ones(gen, monkeypatch):
    """Batch 2, four samples of one prompt that need 1, 5, 2 and 2 tokens: the first ends at the
    prefill and never joins; the third leaves after one step and the fourth takes its slot."""
    lengths = [1, 5, 2, 2]
    script = {
        request_seed(11, j): [9] * (n - 1) + [gen.tokenizer.eos_token_id]
        for j, n in enumerate(lengths)
    }

    def draw(self, scores, generators):
        return torch.tensor([script[g.initial_seed()].pop(0) for g in generators])

    monkeypatch.setattr(NucleusSampler, "draw", draw)
    two = copy.copy(gen)
    two.spec = gen.spec.model_copy(update={"batch_size": 2})
    two.stats = type(gen.stats)()
    (out,) = two.generate(["a"], SamplingParams(max_new_tokens=9, n=4), [11])
    assert [g.completion_tokens for g in out] == lengths
    assert two.stats.steps == 4 and two.stats.row_steps == two.stats.tokens == 10
    assert two.stats.prefill_tokens == len(gen.encode_prompt("a"))  # the samples share it


def test_seeds_must_match_prompts(gen):
    with pytest.raises(ValueError, match="3 prompts but 1 seeds"):
        gen.generate(PROMPTS, SamplingParams(), seeds=[1])


def test_generation_ends_at_end_of_turn_and_stop_strings(gen, monkeypatch):
    """A completion ends at its first stop token (counted, not in the text), at a stop string
    (the text cut before it, counted up to the token that completed it), else at
    max_new_tokens."""
    tok = gen.tokenizer
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    words = tok("fox jumps", add_special_tokens=False)["input_ids"]
    stop = tok(" STOP", add_special_tokens=False)["input_ids"]
    width = len(words) + len(stop) + 2
    script = {1: [*words, eot, *words], 2: [*words, *stop, *words], 3: [*words] * width}

    def draw(self, scores, generators):
        return torch.tensor([script[g.initial_seed()].pop(0) for g in generators])

    monkeypatch.setattr(NucleusSampler, "draw", draw)
    params = SamplingParams(max_new_tokens=width, stop=("STOP",))
    at_eot, at_stop, at_length = gen.generate(
        ["Hi", "Hello", "The quick brown fox"], params, [1, 2, 3]
    )
    assert at_eot[0].text == tok.decode(words) and at_eot[0].finish_reason == "stop"
    assert at_eot[0].completion_tokens == len(words) + 1
    assert at_stop[0].text == tok.decode([*words, *stop]).split("STOP")[0]
    assert at_stop[0].finish_reason == "stop"
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
    # Rows do not depend on the batch, but float rounding of batched kernels can still flip a draw.
    assert fp["batch_size"] == 3
    assert fp["identity"]["model"] == str(tiny_model_dir.resolve())
    assert len(fp["identity"]["files_sha256"]) == 16


# --- the sampler ----------------------------------------------------------------------------


def draws(sampler, scores, seed, steps=2000):
    """Token ids drawn over `steps` calls, every row from one stream seeded `seed`."""
    stream = torch.Generator().manual_seed(seed)
    return torch.cat([sampler.draw(scores, [stream] * len(scores)) for _ in range(steps)]).tolist()


def test_sampler_keeps_the_top_p_nucleus_with_its_proportions():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    picks = draws(NucleusSampler(1.0, 0.7, 0), probs.log(), seed=1)
    # Kept: tokens whose preceding mass is under 0.7, i.e. 0 (0.0) and 1 (0.5); not 2 (0.8).
    assert set(picks) == {0, 1}
    assert picks.count(0) / len(picks) == pytest.approx(0.5 / 0.8, abs=0.04)
    assert draws(NucleusSampler(1.0, 0.7, 0), probs.log(), seed=1) == picks  # same seed
    assert set(draws(NucleusSampler(1.0, 1.0, 1), probs.log(), seed=2, steps=50)) == {0}  # top_k=1


def test_sampler_widens_past_its_first_candidates_and_applies_temperature():
    flat = torch.zeros(2, 5000)  # uniform: 0.98 of the mass needs 4,900 candidates
    picks = draws(NucleusSampler(1.0, 0.98, 0), flat, seed=3, steps=300)
    assert max(picks) > 1024
    peaked = torch.tensor([[4.0, 0.0, 0.0]])  # T=1: token 0 has 0.96; T=100: about a third
    hot = draws(NucleusSampler(100.0, 1.0, 0), peaked, seed=4, steps=600)
    assert hot.count(0) / len(hot) == pytest.approx(1 / 3, abs=0.06)


def test_sampler_rows_draw_from_their_own_streams():
    scores = torch.zeros(3, 50)
    sampler = NucleusSampler(1.0, 0.9, 0)
    alone = [sampler.draw(scores[:1], [torch.Generator().manual_seed(s)]) for s in (1, 2, 3)]
    together = sampler.draw(scores, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert together.tolist() == [int(t) for t in alone]
    # As a logits processor for model.generate: 0 at the drawn token, -inf elsewhere; with one
    # seed per row it draws as the backend does, with one seed every row from one stream.
    rows = NucleusSampler(1.0, 0.9, 0, seed=[1, 2, 3])(None, scores)
    assert rows.argmax(-1).tolist() == together.tolist()
    assert (torch.isinf(rows).sum(-1) == 49).all()
    one = NucleusSampler(1.0, 0.9, 0, seed=1)
    stream = torch.Generator().manual_seed(1)
    assert one(None, scores).argmax(-1).tolist() == sampler.draw(scores, [stream] * 3).tolist()

"""Generator backends behind one interface: `generate(prompts, params, seeds)`.

- `transformers`: CPU or CUDA, bf16 on CUDA, continuously batched (pipeline/batching.py): up to
  `spec.batch_size` requests run at once, a finished one leaves at once and the next takes its
  slot. Each request (prompt, sample index) samples from its own generator seeded by
  `request_seed(seed, index)` (NucleusSampler), so a row's text depends on its prompt, seed and
  settings, never on which rows shared its batch or the batch size (up to float rounding of
  batched kernels, which can flip a draw that lands on a probability boundary).
- `vllm`: offline `LLM.generate` with one `SamplingParams` per request, so each row's seed is its
  own (n samples per request share it, as vLLM draws them from one seeded stream).

Stages get a generator from `env.generator(spec)`; `load_generator(spec)` picks the backend by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from pipeline import models, seeds
from pipeline.prompting import CHAT_FALLBACK, render_prompt
from pipeline.stage import ModelSpec

# Tokens that end a turn besides the tokenizer's eos; Gemma's model turn ends with <end_of_turn>.
_END_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")


class GeneratorSpec(ModelSpec):
    """Which model generates and how it is run; a field of every stage config that generates."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = models.EMBEDDED  # Hub id, local HF folder, or "embedded" (Gemma 3 270M)
    revision: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # bf16 on CUDA, fp32 on CPU
    # Rows decoded at once; on a 2-core CPU 8 runs ~2.5x the batch-1 rate (bench_generate.py).
    batch_size: int = 8
    tensor_parallel_size: int = 1  # vllm only
    gpu_memory_utilization: float = 0.9  # vllm only
    max_model_len: int | None = None  # vllm only; None takes the model's
    # openai only (pipeline/backend_openai.py); batch_size is then the requests in flight.
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    endpoint: Literal["completions", "chat"] = "completions"  # a base model needs completions
    tokenizer: str | None = None  # local tokenizer for chat formatting and counts; None: model
    max_retries: int = Field(5, ge=0)  # on 408/409/429/5xx, timeouts, refused connections
    timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> GeneratorSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url, e.g. http://127.0.0.1:8000/v1")
        return self

    def fingerprint(self) -> dict[str, Any]:
        return {
            **self.model_dump(mode="json"),
            "identity": models.fingerprint(self.model, self.revision),
        }


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    max_new_tokens: int = 256
    n: int = 1  # generations per prompt
    stop: tuple[str, ...] = ()  # extra stop strings; the text is cut before them


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the closing end-of-turn token included
    seed: int  # the seed of the random stream that drew this generation
    error: str = ""  # why the request failed for good (finish_reason "error", text empty)
    transient: bool = False  # it failed only after every retry (a down or busy server)


class Generator(Protocol):
    spec: GeneratorSpec
    model_id: str  # what goes into meta.generator

    def format_chat(self, messages: list[dict[str, str]]) -> str: ...

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int]
    ) -> list[list[Generation]]: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...


class _TokenizerMixin:
    """Chat formatting, prompt encoding and token counting shared by both backends."""

    tokenizer: Any

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """The tokenizer's chat template if it has one, else Gemma's turn format."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return render_prompt(
            CHAT_FALLBACK,
            messages=messages,
            bos_token=self.tokenizer.bos_token or "",
            add_generation_prompt=True,
        )

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids with exactly one leading bos: chat templates write `<bos>` into the text
        themselves, and a second one (tokenizer default) shifts a Gemma model's outputs."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
        ids.discard(None)
        return sorted(ids)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersGenerator(_TokenizerMixin):
    def __init__(self, spec: GeneratorSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline import batching  # imports torch: only once a transformers generator is built

        self.spec = spec
        self.model_id = models.model_id(spec.model, spec.revision)
        path = models.resolve_model_path(spec.model, spec.revision)
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = spec.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, revision=spec.revision, dtype=getattr(torch, dtype)
        ).to(device)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.stop_ids = set(self.stop_token_ids())
        self.stats = batching.Stats()  # summed over calls, for benchmarks

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int]
    ) -> list[list[Generation]]:
        import torch

        from pipeline import batching

        if len(seeds) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds")
        # One request per (prompt, sample index), in order, each with its own random stream.
        requests = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        request_seeds = [request_seed(seeds[i], j) for i, j in requests]
        encoded = [self.encode_prompt(p) for p in prompts]
        sampler = NucleusSampler(params.temperature, params.top_p, params.top_k)
        streams: dict[int, Any] = {}  # request -> its generator, while the request runs

        def pick(logits: Any, rows: list[int]) -> list[int]:
            if params.temperature <= 0:
                return logits.argmax(-1).tolist()
            for r in rows:
                if r not in streams:
                    streams[r] = torch.Generator(device=logits.device).manual_seed(request_seeds[r])
            return sampler.draw(logits, [streams[r] for r in rows]).tolist()

        def done(r: int, tokens: list[int]) -> bool:
            finished = (
                tokens[-1] in self.stop_ids
                or len(tokens) >= params.max_new_tokens
                or (bool(params.stop) and _cut_at_stop(self._decode(tokens), params.stop)[1])
            )
            if finished:
                streams.pop(r, None)
            return finished

        tokens, stats = batching.run(
            self.model, encoded, [i for i, _ in requests], self.spec.batch_size, pick, done
        )
        self.stats.add(stats)
        out: list[list[Generation]] = [[] for _ in prompts]
        for (i, _), seed, row in zip(requests, request_seeds, tokens, strict=True):
            out[i].append(self._to_generation(row, len(encoded[i]), params, seed))
        return out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _to_generation(
        self, tokens: list[int], prompt_tokens: int, params: SamplingParams, seed: int
    ) -> Generation:
        # A row ends at a stop token (counted, as vLLM counts it, but not in the text), at a stop
        # string (the text is cut before it) or at max_new_tokens.
        end = tokens[-1] in self.stop_ids
        text, stopped = _cut_at_stop(self._decode(tokens[:-1] if end else tokens), params.stop)
        return Generation(
            text=text,
            finish_reason="stop" if end or stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            seed=seed,
        )


class NucleusSampler:
    """Temperature, top-k and top-p sampling, each row drawn from its own seeded generator.

    Why not transformers' do_sample=True: its top-p warper sorts the whole vocabulary (262k
    entries for Gemma) and multinomial draws over all of it, every step: ~0.4 s per step at batch
    8 on a 2-core CPU (torch.sort of 8x262k: 300 ms, multinomial: 110 ms), more than the model's
    forward pass, and it grows with the batch. The nucleus nearly always lies among the top 1,024
    logits, so this takes topk of those (~16 ms), widens to 16,384 and then the whole vocabulary
    only for rows whose candidates hold less than top_p of the mass, and draws by inverse CDF. It
    keeps exactly the tokens transformers' TopPLogitsWarper keeps (the most likely ones whose
    preceding mass is under top_p; top_k first, top_p within it).
    """

    CANDIDATES = (1024, 16384)

    def __init__(
        self, temperature: float, top_p: float, top_k: int, seed: int | list[int] | None = None
    ) -> None:
        """`seed` is only for use as a logits processor (`__call__`): the seed of the one stream
        it draws every row from, or one seed per row."""
        self.temperature, self.top_p, self.top_k, self.seed = temperature, top_p, top_k, seed
        self.streams: list[Any] | None = None

    def draw(self, scores: Any, generators: list[Any]) -> Any:
        """One token id per row of `scores` ([rows, vocab]); row k draws from generators[k]."""
        import torch

        logits = scores.float() / self.temperature
        vocab = logits.shape[-1]
        if self.top_k > 0:
            values, index = logits.topk(min(self.top_k, vocab), dim=-1)
            probs = (values - values.logsumexp(-1, keepdim=True)).exp()
        elif self.top_p >= 1:
            index = None
            probs = (logits - logits.logsumexp(-1, keepdim=True)).exp()
        else:
            log_z = logits.logsumexp(-1, keepdim=True)
            for k in (*(c for c in self.CANDIDATES if c < vocab), vocab):
                values, index = logits.topk(k, dim=-1)
                probs = (values - log_z).exp()
                if k == vocab or bool((probs.sum(-1) >= self.top_p).all()):
                    break
        if self.top_p < 1:
            probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)
        cdf = probs.cumsum(-1)
        u = torch.stack(
            [torch.rand((1,), generator=g, device=cdf.device, dtype=cdf.dtype) for g in generators]
        )
        choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        return (choice if index is None else index.gather(-1, choice))[:, 0]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """As a logits processor (for `model.generate`, or a decoder drawing row by row): rows
        that are 0 at the drawn token and -inf elsewhere, so a greedy argmax emits it."""
        import torch

        if self.streams is None:
            seeds = self.seed if isinstance(self.seed, list) else [self.seed or 0]
            self.streams = [torch.Generator(device=scores.device).manual_seed(s) for s in seeds]
        streams = self.streams if len(self.streams) > 1 else self.streams * len(scores)
        token = self.draw(scores, streams)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


def request_seed(seed: int, sample_index: int) -> int:
    """The seed of one request's random stream: the prompt's own seed for its first sample, so a
    row's meta.seed is the seed the stage passed in, and a derived one for further samples."""
    return seed if sample_index == 0 else seeds.derive(seed, sample_index)


class VllmGenerator(_TokenizerMixin):
    """vLLM offline inference. Untested on a real GPU here; its tests use a stand-in `vllm`."""

    def __init__(self, spec: GeneratorSpec) -> None:
        try:
            import vllm
        except ImportError:
            raise ImportError(
                f"backend 'vllm' for {spec.model} needs vLLM, which is not installed; "
                "run `pip install 'retrace[vllm]'` on a CUDA machine, or set backend: transformers"
            ) from None
        self._vllm = vllm
        self.spec = spec
        self.model_id = models.model_id(spec.model, spec.revision)
        kwargs: dict[str, Any] = {
            "model": models.resolve_model_path(spec.model, spec.revision),
            "revision": spec.revision,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "dtype": "bfloat16" if spec.dtype == "auto" else spec.dtype,
        }
        if spec.max_model_len is not None:
            kwargs["max_model_len"] = spec.max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int]
    ) -> list[list[Generation]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds")
        requests = [{"prompt_token_ids": self.encode_prompt(p)} for p in prompts]
        sampling = [
            self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                # vLLM's own default is max_tokens=16 (docs/formats.md#generation-facts): always
                # pass ours.
                max_tokens=params.max_new_tokens,
                seed=seed,
                stop=list(params.stop),
                # Keep special tokens in the text so what we store is what the model emitted.
                skip_special_tokens=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        result = []
        for request, seed, output in zip(requests, seeds, outputs, strict=True):
            gens = []
            for c in output.outputs:
                text, _ = _cut_at_stop(self._strip_end(c.text), params.stop)
                gens.append(
                    Generation(
                        text=text,
                        # "abort" (or any other reason) is unfinished text too.
                        finish_reason="stop" if c.finish_reason == "stop" else "length",
                        prompt_tokens=len(request["prompt_token_ids"]),
                        completion_tokens=len(c.token_ids),
                        seed=seed,
                    )
                )
            result.append(gens)
        return result

    def _strip_end(self, text: str) -> str:
        """vLLM drops the closing end-of-turn text itself; make sure, as versions differ."""
        for token in (self.tokenizer.eos_token, *_END_TOKENS):
            if token and text.endswith(token):
                return text[: -len(token)]
        return text


BACKENDS = {"transformers": TransformersGenerator, "vllm": VllmGenerator}


def load_generator(spec: GeneratorSpec) -> Generator:
    """The generator for `spec`, by backend name."""
    if spec.backend == "openai":  # imported here: backend_openai builds on this module
        from pipeline.backend_openai import OpenAIGenerator

        return OpenAIGenerator(spec)
    return BACKENDS[spec.backend](spec)

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
What every backend shares (spec, params, `Generation`, the tokenizer mixin) is
pipeline/generator_base.py.
"""

from __future__ import annotations

from typing import Any

from pipeline import models, seeds

# The shared base, re-exported: stages and the decoder name a generator's spec and params here.
from pipeline.generator_base import (
    END_TOKENS,
    Generation,
    Generator,
    GeneratorSpec,
    SamplingParams,
    TokenizerMixin,
    cut_at_stop,
)

__all__ = [
    "BACKENDS",
    "Generation",
    "Generator",
    "GeneratorSpec",
    "NucleusSampler",
    "SamplingParams",
    "TransformersGenerator",
    "VllmGenerator",
    "load_generator",
    "request_seed",
]


class TransformersGenerator(TokenizerMixin):
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
                or (bool(params.stop) and cut_at_stop(self._decode(tokens), params.stop)[1])
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
        text, stopped = cut_at_stop(self._decode(tokens[:-1] if end else tokens), params.stop)
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


class VllmGenerator(TokenizerMixin):
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
                text, _ = cut_at_stop(self._strip_end(c.text), params.stop)
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
        for token in (self.tokenizer.eos_token, *END_TOKENS):
            if token and text.endswith(token):
                return text[: -len(token)]
        return text


BACKENDS = {"transformers": TransformersGenerator, "vllm": VllmGenerator}


def load_generator(spec: GeneratorSpec) -> Generator:
    """The generator for `spec`, by backend name."""
    if spec.backend == "openai":  # imported here: it needs httpx2, an extra
        from pipeline.backend_openai import OpenAIGenerator

        return OpenAIGenerator(spec)
    return BACKENDS[spec.backend](spec)

"""What every generator backend shares: its spec, sampling params, `Generation`, the `Generator`
protocol and the tokenizer mixin (chat formatting, prompt encoding, token counts, stop tokens).

One module per backend builds on this one (pipeline/backends.py: transformers and vLLM;
pipeline/backend_openai.py: an OpenAI-compatible server), so a new backend imports public names
from here, never another backend's privates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, model_validator

from pipeline import models
from pipeline.prompting import CHAT_FALLBACK, render_prompt
from pipeline.stage import ModelSpec

# Tokens that end a turn besides the tokenizer's eos; Gemma's model turn ends with <end_of_turn>.
END_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")


# The sampling knobs' bounds, declared once: sample, `decode:`, the guard's retry and every
# override of them (eval's suites) use these types.
Temperature = Annotated[float, Field(ge=0)]  # 0 means greedy
TopP = Annotated[float, Field(gt=0, le=1)]
TopK = Annotated[int, Field(ge=0)]  # 0 means no top-k cut
NewTokens = Annotated[int, Field(gt=0)]  # emitted tokens per turn, taken-back ones included


class GeneratorSpec(ModelSpec):
    """Which model generates and how it is run; a field of every stage config that generates."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = models.EMBEDDED  # Hub id, local HF folder, or "embedded" (Gemma 3 270M)
    revision: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # bf16 on CUDA, fp32 on CPU
    # Rows decoded at once; on a 2-core CPU 8 runs ~2.5x the batch-1 rate (bench_generate.py).
    batch_size: int = Field(8, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # vllm only
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


class TokenizerMixin:
    """Chat formatting, prompt encoding and token counting shared by every backend."""

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
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
        ids.discard(None)
        return sorted(ids)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

"""The `openai` generator backend: any OpenAI-compatible server as the generator.

vLLM `serve`, SGLang, TGI, llama.cpp's server and `transformers serve` all speak this API. The
backend sends one request per prompt (with `n`, `seed`, `stop`, and `top_k` when set, which vLLM
and SGLang accept beyond OpenAI's schema), `spec.batch_size` of them in flight at once.

- `endpoint: completions` (the default, and what a base model needs) sends the prompt text the
  stage built with the local tokenizer's chat template or Gemma's turn format: the same text the
  in-process backends encode, so a model behind a server sees the same prompt. A leading bos is
  left to the server when its tokenizer adds one itself (as vLLM's and transformers' do), so the
  prompt never starts with two.
- `endpoint: chat` sends the messages and lets the server apply its template (a hosted chat
  model). The local tokenizer still counts prompt tokens, on its own template.

The local tokenizer is `spec.tokenizer` (default: `spec.model`, so a model served by name needs
its tokenizer in the Hugging Face cache or a local folder). The API key is read from the
environment variable `spec.api_key_env` and only ever sent as a header.

Retries: refused connections, timeouts, 408/409/429 and 5xx are retried `spec.max_retries` times
with exponential backoff and jitter (a `Retry-After` header wins); other statuses fail at once. A
request that fails for good comes back as `n` generations with `finish_reason="error"`, empty text
and the server's reason in `error`, so the stage rejects its row instead of dropping it.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2

from pipeline import models, seeds
from pipeline.backends import (
    _END_TOKENS,
    Generation,
    GeneratorSpec,
    SamplingParams,
    _cut_at_stop,
    _TokenizerMixin,
)

RETRIABLE = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class RequestFailed(Exception):
    """A request that failed for good; the message is the server's reason, in one line."""


class OpenAIGenerator(_TokenizerMixin):
    def __init__(self, spec: GeneratorSpec) -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self.model_id = models.model_id(spec.model, spec.revision)
        source = spec.tokenizer or spec.model
        self.tokenizer = AutoTokenizer.from_pretrained(
            models.resolve_model_path(source, spec.revision), revision=spec.revision
        )
        self.base_url = (spec.base_url or "").rstrip("/")
        self.url = (
            f"{self.base_url}/{'chat/completions' if spec.endpoint == 'chat' else 'completions'}"
        )
        headers = {}
        key = os.environ.get(spec.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        workers = max(1, spec.batch_size)
        self.client = httpx2.Client(
            headers=headers,
            timeout=spec.timeout_s,
            limits=httpx2.Limits(max_connections=workers, max_keepalive_connections=workers),
        )
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai")
        vocab = self.tokenizer.get_vocab()
        ends = (self.tokenizer.eos_token, *_END_TOKENS)
        self.end_texts = tuple(dict.fromkeys(t for t in ends if t and t in vocab))
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a")["input_ids"]
        self.server_adds_bos = bos is not None and bool(probe) and probe[0] == bos
        self._check_server()

    # --- the protocol ------------------------------------------------------------------------

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Completions: the templated text. Chat: the messages as JSON, sent as they are."""
        if self.spec.endpoint == "chat":
            return json.dumps(messages, ensure_ascii=False)
        return super().format_chat(messages)

    def count_tokens(self, texts: list[str]) -> list[int]:
        if self.spec.endpoint == "chat":
            texts = [_TokenizerMixin.format_chat(self, json.loads(t)) for t in texts]
        return super().count_tokens(texts)

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int]
    ) -> list[list[Generation]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds")
        jobs = zip(prompts, seeds, strict=True)
        return list(self.pool.map(lambda job: self._complete(*job, params), jobs))

    # --- one prompt --------------------------------------------------------------------------

    def _complete(self, prompt: str, seed: int, params: SamplingParams) -> list[Generation]:
        """n generations for one prompt; a server that ignores `n` gets one request per sample,
        each seeded `seeds.derive(seed, index)`."""
        gens: list[Generation] = []
        try:
            data = self._send("POST", self.url, self._body(prompt, seed, params, params.n))
            gens += self._parse(data, seed, params)
            while len(gens) < params.n:
                extra = seeds.derive(seed, len(gens))
                data = self._send("POST", self.url, self._body(prompt, extra, params, 1))
                gens += self._parse(data, extra, params)[:1]
        except RequestFailed as err:
            failed = Generation(
                "", "error", prompt_tokens=0, completion_tokens=0, seed=seed, error=str(err)
            )
            return [failed] * params.n
        return gens[: params.n]

    def _body(self, prompt: str, seed: int, params: SamplingParams, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.spec.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
        }
        if n > 1:
            body["n"] = n
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if self.spec.endpoint == "chat":
            body["messages"] = json.loads(prompt)
            stop = list(params.stop)
        else:
            bos = self.tokenizer.bos_token
            if self.server_adds_bos and bos and prompt.startswith(bos):
                prompt = prompt[len(bos) :]
            body["prompt"] = prompt
            # A base model's turn ends at its end-of-turn text, which the server may not know.
            stop = list(dict.fromkeys([*params.stop, *self.end_texts]))
        if stop:
            body["stop"] = stop
        return body

    def _parse(self, data: dict[str, Any], seed: int, params: SamplingParams) -> list[Generation]:
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            usage = data.get("usage") or {}
            texts = [
                (c["message"]["content"] or "") if self.spec.endpoint == "chat" else c["text"]
                for c in choices
            ]
        except (KeyError, TypeError) as err:
            raise RequestFailed(f"{self.url}: a response without {err} in its choices") from None
        if not choices:
            raise RequestFailed(f"{self.url}: a response with no choices")
        gens = []
        for choice, raw in zip(choices, texts, strict=True):
            text, _ = _cut_at_stop(raw, (*params.stop, *self.end_texts))
            finished = choice.get("finish_reason") == "stop"
            if len(choices) == 1 and "completion_tokens" in usage:
                completion = int(usage["completion_tokens"])
            else:  # usage sums the choices: count each one here, its closing token included
                completion = _TokenizerMixin.count_tokens(self, [text])[0] + int(finished)
            gens.append(
                Generation(
                    text=text,
                    # "abort", "content_filter" or none at all is unfinished text too.
                    finish_reason="stop" if finished else "length",
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=completion,
                    seed=seed,
                )
            )
        return gens

    # --- HTTP --------------------------------------------------------------------------------

    def _send(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response's JSON, retrying what a busy or restarting server answers."""
        attempts = self.spec.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self.client.request(method, url, json=body)
            except httpx2.TransportError as err:  # refused, reset, timed out
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise RequestFailed(f"{url}: a response that is not JSON") from None
                reason = f"HTTP {response.status_code}: {_server_message(response)}"
                if response.status_code not in RETRIABLE and response.status_code < 500:
                    raise RequestFailed(f"{url}: {reason}")
                retry_after = _retry_after(response)
            if attempt + 1 < attempts:
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1)
                time.sleep(retry_after if retry_after is not None else delay)
        raise RequestFailed(f"{url}: {reason} (after {attempts} attempts)")

    def _check_server(self) -> None:
        """Fail before any work when the server is unreachable, refuses us or lacks the model."""
        url = f"{self.base_url}/models"
        try:
            data = self._send("GET", url)
        except RequestFailed as err:
            raise RuntimeError(
                f"openai backend: {err}; start the server, or fix generator.base_url (and "
                f"${self.spec.api_key_env} if it needs a key)"
            ) from None
        served = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if served and self.spec.model not in served:
            raise RuntimeError(
                f"openai backend: {self.base_url} does not serve model {self.spec.model!r}; it "
                f"serves {', '.join(map(str, served))}: set generator.model to one of them"
            )


def _server_message(response: httpx2.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error:
            return str(error)[:300]
    return json.dumps(data)[:300]


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None

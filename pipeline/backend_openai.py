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
and the server's reason in `error` (`transient` when the retries ran out, so a rerun retries the
row), so the stage rejects its row instead of dropping it. A reply of the wrong shape (no choices,
a choice that is not an object, a token count that is not a count) fails its request the same way.
A server that is down, refuses us or lacks the model fails before any work with one line
(`ServerError`).

Server text never carries the key out: every reason that leaves this module (a row's `error`, a
`ServerError`) goes through `scrub`, which takes out the key and any bearer token or api_key value
a server echoes back (some proxies quote the request headers in their 400s).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import httpx2
from pydantic import BaseModel, Field, ValidationError

from pipeline import models, seeds
from pipeline.errors import RetraceError
from pipeline.generator_base import (
    END_TOKENS,
    Generation,
    GeneratorSpec,
    SamplingParams,
    TokenizerMixin,
    cut_at_stop,
)

RETRIABLE = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0


class RequestFailed(Exception):
    """A request that failed for good; the message is the server's reason, in one line.
    `transient`: it failed only after every retry (a down, busy or restarting server)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ServerError(RetraceError):
    """The server is unreachable, refuses us or does not serve the model."""


# --- the reply's shape: what _parse reads, checked before it is read --------------------------

Count = Annotated[int, Field(ge=0, strict=True)]  # strict: true/1.5/"many" are not counts


class _Message(BaseModel):
    content: str | None = None  # null for a tool call: no text


class _Choice(BaseModel):
    index: Count = 0
    text: str | None = None  # completions
    message: _Message | None = None  # chat
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None


class _Reply(BaseModel):
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


def _shape_problem(err: ValidationError) -> str:
    """The first problem of a reply, as 'where: what' (never the offending value)."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "the reply"
    # pydantic names the model class here ("instance of _Choice"), which means nothing to a user.
    what = "should be an object" if first["type"] == "model_type" else first["msg"]
    return f"{where}: {what}"


# --- keeping the key out of what the server says ----------------------------------------------

REDACTED = "***"
_END = r"""[^\s"'`\\&,;)}\]]+"""  # a token value ends at a space, quote, separator or bracket
_SECRETS = (
    # "Authorization: Bearer x", "authorization=x", '"Authorization": "Basic x"'
    re.compile(
        rf"""(authorization\\?["']?\s*[:=]\s*\\?["']?(?:(?:bearer|basic|token)\s+)?){_END}""",
        re.IGNORECASE,
    ),
    re.compile(rf"(\bbearer\s+){_END}", re.IGNORECASE),
    # api_key=x, api-key: x, "apiKey": "x", x-api-key: x
    re.compile(rf"""(api[_-]?key\\?["']?\s*[:=]\s*\\?["']?){_END}""", re.IGNORECASE),
)


def scrub(text: str, key: str | None) -> str:
    """`text` with the API key taken out: the key itself (as sent, JSON-escaped or URL-quoted),
    wherever it appears, and any bearer token, Authorization or api_key value."""
    if key:
        for form in dict.fromkeys([key, json.dumps(key)[1:-1], urllib.parse.quote(key, safe="")]):
            text = text.replace(form, REDACTED)
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class OpenAIGenerator(TokenizerMixin):
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
        # Stripped: a key read from a file keeps its newline, which is no valid header value.
        self.key = (os.environ.get(spec.api_key_env) or "").strip()
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        workers = spec.batch_size  # at least 1 (GeneratorSpec)
        self.client = httpx2.Client(
            headers=headers,
            timeout=spec.timeout_s,
            limits=httpx2.Limits(max_connections=workers, max_keepalive_connections=workers),
        )
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai")
        vocab = self.tokenizer.get_vocab()
        ends = (self.tokenizer.eos_token, *END_TOKENS)
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
            texts = [TokenizerMixin.format_chat(self, json.loads(t)) for t in texts]
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
                "",
                "error",
                prompt_tokens=0,
                completion_tokens=0,
                seed=seed,
                error=scrub(str(err), self.key),
                transient=err.transient,
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

    def _parse(self, data: Any, seed: int, params: SamplingParams) -> list[Generation]:
        try:
            reply = _Reply.model_validate(data)
        except ValidationError as err:
            problem = _shape_problem(err)
            raise RequestFailed(f"{self.url}: a reply of the wrong shape ({problem})") from None
        choices = sorted(reply.choices, key=lambda c: c.index)
        chat = self.spec.endpoint == "chat"
        if any((c.message is None) if chat else (c.text is None) for c in choices):
            field = "message" if chat else "text"
            raise RequestFailed(f"{self.url}: a reply with a choice that has no {field}")
        usage = reply.usage or _Usage()
        gens = []
        for choice in choices:
            raw = (choice.message.content or "") if chat else choice.text
            text, _ = cut_at_stop(raw, (*params.stop, *self.end_texts))
            finished = choice.finish_reason == "stop"
            if len(choices) == 1 and usage.completion_tokens is not None:
                completion = usage.completion_tokens
            else:  # usage sums the choices: count each one here, its closing token included
                completion = TokenizerMixin.count_tokens(self, [text])[0] + int(finished)
            gens.append(
                Generation(
                    text=text,
                    # "abort", "content_filter" or none at all is unfinished text too.
                    finish_reason="stop" if finished else "length",
                    prompt_tokens=usage.prompt_tokens or 0,
                    completion_tokens=completion,
                    seed=seed,
                )
            )
        return gens

    # --- HTTP --------------------------------------------------------------------------------

    def _send(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """The response's JSON, retrying what a busy or restarting server answers."""
        attempts = self.spec.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                response = self.client.request(method, url, json=body)
            except httpx2.TransportError as err:  # refused, reset, timed out
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            except httpx2.RequestError as err:  # a body that does not decode, a redirect loop
                raise RequestFailed(f"{url}: {type(err).__name__}: {err}") from None
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise RequestFailed(f"{url}: a response that is not JSON") from None
                reason = f"HTTP {response.status_code}: {_server_message(response, self.key)}"
                if response.status_code not in RETRIABLE and response.status_code < 500:
                    raise RequestFailed(f"{url}: {reason}")
                retry_after = _retry_after(response)
            if attempt + 1 < attempts:
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1)
                time.sleep(retry_after if retry_after is not None else delay)
        raise RequestFailed(f"{url}: {reason} (after {attempts} attempts)", transient=True)

    def _check_server(self) -> None:
        """Fail before any work when the server is unreachable, refuses us or lacks the model."""
        url = f"{self.base_url}/models"
        try:
            data = self._send("GET", url)
        except RequestFailed as err:
            raise ServerError(
                scrub(
                    f"openai backend: {err}; start the server, or fix generator.base_url (and "
                    f"${self.spec.api_key_env} if it needs a key)",
                    self.key,
                )
            ) from None
        # Only an OpenAI-shaped model list is checked; a server that lists its models some other
        # way still gets its requests, whose replies are checked one by one.
        listed = data.get("data") if isinstance(data, dict) else None
        served = [m["id"] for m in listed or () if isinstance(m, dict) and "id" in m]
        if served and self.spec.model not in served:
            raise ServerError(
                scrub(
                    f"openai backend: {self.base_url} does not serve model {self.spec.model!r}; "
                    f"it serves {', '.join(map(str, served))}: set generator.model to one of them",
                    self.key,
                )
            )


def _server_message(response: httpx2.Response, key: str | None) -> str:
    """The server's reason, scrubbed before it is cut to 300 characters (a cut through the key
    would leave its first characters behind)."""
    try:
        data = response.json()
    except ValueError:
        return scrub(response.text, key)[:300].strip() or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error:
            return scrub(str(error), key)[:300]
    return scrub(json.dumps(data), key)[:300]


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return min(60.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None

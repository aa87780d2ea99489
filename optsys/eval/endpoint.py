"""A rollout engine that generates through a running vLLM OpenAI-compatible server (`python -m optsys.serve`).

    engine = EndpointEngine("http://127.0.0.1:8000")            # model: the server's first in GET /v1/models
    engine.generate(prompts, Sampling(n=4, temperature=0.7), seeds) -> [[Completion] * 4 per prompt]

The same interface as the in-process engines (optsys.rollout.engine), so evaluation and test-time methods run
against a server unchanged. Prompts are token ids, rendered by the caller (chat template, budget forcing), and
go to POST /v1/completions as a token list: the server never re-renders or re-tokenizes them. Each prompt is one
request with its own seed, `concurrency` at a time from a thread pool; results come back in prompt order.

vLLM extensions of the completions API this relies on (vLLM 0.32, vllm/entrypoints/openai/completion/protocol.py):
- `return_token_ids`: each choice carries `token_ids`, the generated ids (a stop token included when it ended the
  completion, as in-process). Nothing is re-tokenized from text.
- `logprobs: 0`: `choices[i].logprobs.token_logprobs` is the sampled token's log-prob at each step; with the
  server's --logprobs-mode processed_logprobs (optsys.serve sets it) that is the sampler's distribution after
  temperature / top-p / top-k, what Completion.logprobs means. A server that returns none (or a different
  count) gives Completion.logprobs = () rather than wrong numbers.
- `top_k`, `min_p`, `repetition_penalty` and the presence / frequency penalties are always sent (their "off"
  values): a field left out is not "off" but the server's default, which vLLM takes from the model's
  generation_config.json (Qwen2.5-Instruct ships top_k=20, repetition_penalty=1.05), so leaving them out would
  sample from another distribution than the one asked for.
- `stop_token_ids`; and `prompt_logprobs` for token_logprobs (scoring).
Connection errors, timeouts, 5xx and 429 (rate limited) are retried (`retries` times, exponential backoff from
`backoff_s`, or the server's Retry-After when it says, up to 60 s); another 4xx (a prompt longer than the context,
an unknown model name, a missing API key) raises EngineError at once with the server's message. `api_key` (else
the OPENAI_API_KEY environment variable) goes in an `Authorization: Bearer` header, what a server started with
`--api-key` asks for. `context_length()` reads the served model's max_model_len from GET /v1/models.
HTTP goes through the standard library (urllib, one connection per request): the client needs neither vLLM
nor an HTTP package on the machine that evaluates.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from optsys.rollout.engine import Completion, EngineError, Sampling


class EndpointEngine:
    name = "endpoint"

    def __init__(self, url: str, *, model: str | None = None, timeout_s: float = 120, retries: int = 3,
                 backoff_s: float = 1.0, concurrency: int = 8, api_key: str | None = None):
        if retries < 0 or concurrency < 1:
            raise ValueError(f"retries must be >= 0 and concurrency >= 1 (got {retries}, {concurrency})")
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url  # accept the OpenAI-client style base URL
        self.timeout_s, self.retries, self.backoff_s, self.concurrency = timeout_s, retries, backoff_s, concurrency
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.max_model_len: int | None = None
        self._models: list[dict] | None = None
        if model is None:
            models = self.served_models()
            if not models:
                raise EngineError(f"{self.url}/v1/models lists no model; pass EndpointEngine(model=...)")
            model = models[0]["id"]  # the base model: vLLM lists it before its LoRA adapters
            self.max_model_len = models[0].get("max_model_len")
        self.model = model

    def served_models(self) -> list[dict]:
        """GET /v1/models's entries (asked once)."""
        if self._models is None:
            self._models = list(self._request("GET", "/v1/models").get("data") or [])
        return self._models

    def served_folder(self) -> str | None:
        """The folder the served model was loaded from (vLLM's `root` in GET /v1/models; for a LoRA adapter its
        `parent`, the base), when it is a folder on this machine: a local server's tokenizer. Else None."""
        from pathlib import Path

        by_id = {m.get("id"): m for m in self.served_models()}
        entry = by_id.get(self.model) or {}
        if entry.get("parent") in by_id:  # an adapter: the base model's folder holds the tokenizer
            entry = by_id[entry["parent"]]
        root = entry.get("root")
        return root if isinstance(root, str) and Path(root).is_dir() else None

    def context_length(self) -> int | None:
        """The served model's max_model_len as GET /v1/models reports it (vLLM does), None when the server does
        not say. A model name the server does not serve is an EngineError naming the ones it does."""
        models = self.served_models()
        entry = next((m for m in models if m.get("id") == self.model), None)
        if entry is None:
            raise EngineError(f"{self.url} does not serve a model named {self.model!r}; it serves "
                              f"{[m.get('id') for m in models]} (endpoint_model names one of them)")
        length = entry.get("max_model_len")
        self.max_model_len = int(length) if length else None
        return self.max_model_len

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        """sampling.n completions per prompt; `seeds` (one per prompt) make each prompt's samples reproducible."""
        if len(seeds) != len(prompts):
            raise ValueError(f"one seed per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
        bodies = [dict(model=self.model, prompt=list(p), n=sampling.n, temperature=sampling.temperature,
                       top_p=sampling.top_p, top_k=max(sampling.top_k, 0), min_p=0.0, repetition_penalty=1.0,
                       presence_penalty=0.0, frequency_penalty=0.0,
                       max_tokens=sampling.max_new_tokens, seed=int(s), stop_token_ids=list(sampling.stop_token_ids),
                       logprobs=0, return_token_ids=True)
                  for p, s in zip(prompts, seeds)]
        return [[_completion(c) for c in sorted(r["choices"], key=lambda c: c["index"])]
                for r in self._post_all(bodies)]

    def token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """log p(token | prefix) of sequence[start:] for each sequence, at temperature 1 (vLLM's prompt_logprobs)."""
        bodies = [dict(model=self.model, prompt=list(s), max_tokens=1, temperature=1.0, prompt_logprobs=0)
                  for s in sequences]
        result = []
        for r, seq, start in zip(self._post_all(bodies), sequences, starts):
            steps = r["choices"][0].get("prompt_logprobs")
            if steps is None:
                raise EngineError(f"the endpoint {self.url} does not support scoring: its completions answer has no "
                                  f"prompt_logprobs (a vLLM server does; start one with `python -m optsys.serve`)")
            # steps[i]: {token id (a JSON string): {"logprob": ...}} for token i given tokens < i (steps[0] is None)
            result.append([float(steps[i][str(seq[i])]["logprob"]) for i in range(start, len(seq))])
        return result

    def close(self) -> None:
        """Nothing to free here: the server owns the model (stop it where it was started)."""

    def _post_all(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(bodies), 1))) as pool:
            return list(pool.map(lambda b: self._request("POST", "/v1/completions", b), bodies))

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call with bounded retries on connection errors, timeouts and 5xx; a 4xx raises at once."""
        target = f"{self.url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts, last, wait = self.retries + 1, "", None
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait if wait is not None else self.backoff_s * 2 ** (attempt - 1))
            wait = None
            request = urllib.request.Request(target, method=method, headers=headers,
                                             data=None if body is None else json.dumps(body).encode())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                    status, data = r.status, r.read()
            except urllib.error.HTTPError as e:  # the server answered 4xx / 5xx
                status, data = e.code, e.read()
                wait = _retry_after(e.headers)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            if status >= 500 or status == 429:  # overloaded or rate limited: worth another try
                last = f"HTTP {status}: {_server_message(data)}"
                continue
            if status in (401, 403):
                raise EngineError(f"{method} {target} was refused (HTTP {status}): {_server_message(data)}. The "
                                  f"server wants an API key: pass --api-key KEY or set OPENAI_API_KEY"
                                  f"{' (the key sent was not accepted)' if self.api_key else ''}")
            if status >= 400:
                raise EngineError(f"{method} {target} was refused (HTTP {status}): {_server_message(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise EngineError(f"{method} {target} answered HTTP {status} with no JSON: {data[:200]!r}; is it "
                                  f"a vLLM OpenAI-compatible server?") from None
        raise EngineError(f"{method} {target} failed after {attempts} attempts; last error: {last}. Is the server up "
                          f"at {self.url}? Start one with `python -m optsys.serve --model PATH --port PORT`, or "
                          f"raise timeout_s ({self.timeout_s} s) if generations are long")


def _retry_after(headers) -> float | None:
    """The server's Retry-After in seconds (an integer form only), capped at 60; None when absent."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def _completion(choice: dict) -> Completion:
    ids = choice.get("token_ids")
    if ids is None:
        raise EngineError("the server's completion has no token_ids: it ignores `return_token_ids` (a vLLM "
                          "extension); serve the model with `python -m optsys.serve`")
    lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
    lps = tuple(float(x) for x in lps) if len(lps) == len(ids) and None not in lps else ()
    return Completion(tuple(ids), lps, "length" if choice.get("finish_reason") == "length" else "stop")


def _server_message(body: bytes) -> str:
    """vLLM's {"error": {"message": ...}}, else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace")
    err = data.get("error", data) if isinstance(data, dict) else data
    return str(err.get("message", err) if isinstance(err, dict) else err)[:1000]

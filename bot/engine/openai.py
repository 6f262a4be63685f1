"""The remote engine: an OpenAI-compatible server (vLLM, TGI, llama.cpp, ``transformers serve``).

The bot still owns the prompt. It builds the ids with the model's own tokenizer
(loaded locally, no weights) and streams ``POST {base_url}/v1/completions``
with ``stream: true`` and the settings in force. With ``[model] api = "chat"``
the turns go to ``/v1/chat/completions`` as chat messages instead.

Servers differ in what ``/v1/completions`` accepts, so the request is sent in
the first *dialect* the server takes, remembered after the first success:

``ids``
    the prompt as token ids, ``top_k`` and ``repetition_penalty`` beside the
    OpenAI fields (vLLM, llama.cpp's server). Ids are best: the server cannot
    re-tokenize a ``</s>`` typed by a user into a real end of sequence.
``text``
    the prompt as text, same fields (servers that want a string).
``hf``
    text, with sampling in a ``generation_config`` JSON (``transformers serve``,
    which rejects unknown fields).
``plain``
    text and the OpenAI fields only (``top_k`` and ``repetition_penalty`` lost).

When the prompt goes as text, special-token strings inside user text are
broken with an invisible U+2060 so that the server's tokenizer cannot turn
them into special tokens.

Every failure (refused, HTTP error, a silent server past ``request_timeout``,
a stream cut mid-way) is a :class:`~bot.errors.GenerationError` whose text is
one clause for the user; closing the stream closes the HTTP response, which
is how a server learns that the reply was cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from bot.config import ModelConfig
from bot.engine.base import StreamStats
from bot.engine.transformers import HFPromptTokenizer, generation_kwargs, load_tokenizer
from bot.errors import GenerationError
from bot.prompt import chat_messages, fit_messages
from bot.tokenizer import PromptTokenizer
from bot.types import Settings, Turn

log = logging.getLogger(__name__)

Dialect = Literal["ids", "text", "hf", "plain"]
DIALECTS: tuple[Dialect, ...] = ("ids", "text", "hf", "plain")
WORD_JOINER = "\u2060"
#: Stop strings sent to the server (the worker's StopFilter still has the last word).
XWIN_SERVER_STOPS = (" USER:", "\nUSER:", "</s>")
CHAT_SERVER_STOPS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")


@dataclass
class _Outcome:
    """What the SSE stream said about itself."""

    finished: bool = False
    new_tokens: int = 0


class OpenAIEngine:
    """Streams replies from ``[model] base_url``; see the module docstring."""

    #: Set by :meth:`start` (or the constructor): the model's own tokenizer.
    tokenizer: PromptTokenizer

    def __init__(self, config: ModelConfig, *, api_key: str = "",
                 tokenizer: HFPromptTokenizer | None = None) -> None:
        self.config = config
        self.context_length = config.context_length
        self.prompt_format: str = config.prompt_format
        self.max_batch = config.max_concurrency
        self.last_stats: StreamStats | None = None
        self.base_url = config.base_url.rstrip("/")
        self._api_key = api_key
        self._hf = tokenizer
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self._session: aiohttp.ClientSession | None = None
        self._model = config.served_model
        self._server_models: list[str] = []
        self._dialect: Dialect | None = None

    def _hf_tokenizer(self) -> HFPromptTokenizer:
        if self._hf is None:
            raise GenerationError("the tokenizer is not loaded")
        return self._hf

    # -- life cycle ------------------------------------------------------
    async def start(self) -> None:
        if self._hf is None:
            self._hf = await asyncio.to_thread(load_tokenizer, self.config)
            self.tokenizer = self._hf
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.request_timeout, sock_read=self.config.request_timeout
        )
        connector = aiohttp.TCPConnector(limit=self.max_batch + 2)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                              headers=self._headers())
        try:
            await self._fetch_models()
        except GenerationError as exc:
            # The server may start after the bot; replies say so until it is up.
            log.warning("model server %s not usable yet: %s", self.base_url, exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self) -> dict[str, str]:
        model = self._model or "(not known yet: server unreachable)"
        info = {"engine": "openai", "server": self.base_url, "model": model,
                "api": self.config.api}
        if self.config.api == "completions":
            info["prompt sent as"] = {None: "not known yet", "ids": "token ids"}.get(
                self._dialect, f"text ({self._dialect})")
        return info

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise GenerationError("the remote engine is not started")
        return self._session

    # -- /v1/models ------------------------------------------------------
    async def _fetch_models(self) -> None:
        async with _TransportErrors(self.config.request_timeout):
            async with self._http().get(f"{self.base_url}/v1/models") as resp:
                await _raise_for_status(resp)
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise GenerationError("the model server sent a malformed model list")
        self._server_models = [str(m.get("id")) for m in body["data"] if isinstance(m, dict)]
        if not self._model and self._server_models:
            self._model = self._server_models[0]
        if self._model and self._server_models and self._model not in self._server_models:
            log.warning("server %s does not list model %r (it has: %s)", self.base_url, self._model,
                        ", ".join(self._server_models))
        log.info("model server %s serves %s", self.base_url, ", ".join(self._server_models) or "?")

    async def _ensure_model(self) -> None:
        if not self._model:
            await self._fetch_models()
        if not self._model:
            raise GenerationError("the model server lists no model to use")

    # -- streaming -------------------------------------------------------
    async def stream(self, prompt_ids: list[int], settings: Settings, *,
                     turns: Sequence[Turn] = (), is_dm: bool = False) -> AsyncGenerator[str, None]:
        """Text pieces of the reply. ``turns``/``is_dm`` are used only with
        ``api = "chat"`` (the server applies its own chat template)."""
        stats = StreamStats(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        outcome = _Outcome()
        try:
            await self._ensure_model()
            resp = await self._open(prompt_ids, settings, turns, is_dm)
            async for piece in self._pieces(resp, outcome):
                if stats.first_token_s == 0.0:
                    stats.first_token_s = time.perf_counter() - started
                stats.new_tokens += 1
                yield piece
        finally:
            stats.total_s = time.perf_counter() - started
            stats.new_tokens = max(stats.new_tokens, outcome.new_tokens)
            self.last_stats = stats

    async def _open(self, prompt_ids: list[int], settings: Settings,
                    turns: Sequence[Turn], is_dm: bool) -> aiohttp.ClientResponse:
        if self.config.api == "chat":
            body = self._chat_body(turns, settings, is_dm)
            return await self._post("/v1/chat/completions", body)
        return await self._open_completion(prompt_ids, settings)

    async def _open_completion(self, prompt_ids: list[int], settings: Settings) -> aiohttp.ClientResponse:
        """POST in the remembered dialect, or find the first one the server takes."""
        tries = (self._dialect,) if self._dialect else DIALECTS
        rejected = _Rejected(400, "")
        for dialect in tries:
            body = self._completion_body(dialect, prompt_ids, settings)
            try:
                resp = await self._post("/v1/completions", body, probing=len(tries) > 1)
            except _Rejected as exc:
                log.info("server rejected the %r request dialect: %s", dialect, exc)
                rejected = exc
                continue
            if self._dialect is None:
                log.info("server %s takes the %r request dialect", self.base_url, dialect)
                self._dialect = dialect
            return resp
        raise GenerationError(_status_sentence(rejected.status))

    async def _post(self, path: str, body: dict[str, Any], *,
                    probing: bool = False) -> aiohttp.ClientResponse:
        async with _TransportErrors(self.config.request_timeout):
            resp = await self._http().post(f"{self.base_url}{path}", json=body)
            if probing and resp.status in (400, 422):
                detail = (await resp.text())[:300]
                resp.release()
                raise _Rejected(resp.status, detail)
            try:
                await _raise_for_status(resp)
            except BaseException:
                resp.release()
                raise
            return resp

    async def _pieces(self, resp: aiohttp.ClientResponse, outcome: _Outcome) -> AsyncIterator[str]:
        """Text pieces from the SSE body; the response is closed however this ends."""
        joiner = _SurrogateJoiner()
        try:
            async with _TransportErrors(self.config.request_timeout, streaming=True):
                async for event in _sse_events(resp):
                    if piece := joiner.push(_event_text(event, outcome)):
                        yield piece
            if tail := joiner.flush():
                yield tail
            if not outcome.finished:
                raise GenerationError("the model server stopped in the middle of the reply", retryable=True)
        finally:
            resp.close()  # cancels generation on the server if the reply is not done

    # -- request bodies ----------------------------------------------------
    def _stops(self) -> list[str]:
        return list(XWIN_SERVER_STOPS if self.prompt_format == "xwin" else CHAT_SERVER_STOPS)

    def _sampling(self, settings: Settings) -> dict[str, Any]:
        return {
            "model": self._model,
            "stream": True,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        } | ({"stop": stops} if (stops := self._stops()) else {})

    def _completion_body(self, dialect: Dialect, prompt_ids: list[int], settings: Settings) -> dict[str, Any]:
        body = self._sampling(settings)
        if dialect == "ids":
            body["prompt"] = list(prompt_ids)
        else:
            body["prompt"] = prompt_text(self._hf_tokenizer(), prompt_ids)
        if dialect in ("ids", "text"):
            body.update(top_k=settings.top_k if settings.top_k > 0 else -1,
                        repetition_penalty=settings.repetition_penalty)
        elif dialect == "hf":
            # The same arguments the in-process engine gives generate(); unset ones left out.
            kwargs = generation_kwargs(settings, self._hf_tokenizer())
            body["generation_config"] = json.dumps({k: v for k, v in kwargs.items() if v is not None})
        return body

    def _chat_body(self, turns: Sequence[Turn], settings: Settings, is_dm: bool) -> dict[str, Any]:
        if not turns:
            raise GenerationError("the chat API needs the conversation's turns")
        body = self._sampling(settings)
        tok = self._hf_tokenizer()
        # Xwin's tokenizer has no template (the server brings its own): then fitting estimates.
        body["messages"] = fit_messages(chat_messages(turns, settings, is_dm), tok,
                                        self.context_length - settings.max_new_tokens,
                                        exact=bool(getattr(tok.hf, "chat_template", None)))
        body.pop("stop", None)  # the server's chat template knows its own end of turn
        return body


# -- prompt text ---------------------------------------------------------------
def prompt_text(tokenizer: HFPromptTokenizer, ids: Sequence[int]) -> str:
    """The prompt as text that the server's tokenizer turns back into ``ids``:
    special tokens spelled out, special-token strings inside plain text broken
    (U+2060), and a leading BOS left out where the tokenizer adds its own."""
    hf = tokenizer.hf
    special_ids = set(hf.all_special_ids)
    specials = sorted((s for s in hf.all_special_tokens if s), key=len, reverse=True)
    ids = list(ids)
    if ids and ids[0] == tokenizer.bos_id and _adds_bos(tokenizer):
        ids = ids[1:]
    parts: list[str] = []
    for is_special, run in _runs(ids, special_ids):
        if is_special:
            parts.append("".join(hf.convert_ids_to_tokens(run)))
        else:
            parts.append(_defuse_specials(hf.decode(run, skip_special_tokens=False), specials))
    return "".join(parts)


def _adds_bos(tokenizer: HFPromptTokenizer) -> bool:
    ids = tokenizer.hf("a")["input_ids"]
    return bool(ids) and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id


def _runs(ids: Sequence[int], special_ids: set[int]) -> list[tuple[bool, list[int]]]:
    runs: list[tuple[bool, list[int]]] = []
    for i in ids:
        kind = i in special_ids
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(i)
        else:
            runs.append((kind, [i]))
    return runs


def _defuse_specials(text: str, specials: Sequence[str]) -> str:
    for s in specials:
        if len(s) > 1 and s in text:
            text = text.replace(s, s[0] + WORD_JOINER + s[1:])
    return text


# -- SSE -----------------------------------------------------------------------------
async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
    """JSON payloads of ``data:`` lines; ``None`` for ``[DONE]``. Lines are read
    whole before decoding, so a character split across TCP packets is joined."""
    async for raw in resp.content:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            log.warning("model server sent a malformed event: %.200s", data)
            raise GenerationError("the model server sent a malformed reply") from None
        if isinstance(payload, dict):
            yield payload


def _event_text(event: dict[str, Any] | None, outcome: _Outcome) -> str:
    if event is None:
        outcome.finished = True
        return ""
    if "error" in event:
        log.warning("model server reported an error: %.300s", event["error"])
        raise GenerationError("the model server failed while writing the reply", retryable=True)
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        outcome.new_tokens = usage["completion_tokens"]
    text = ""
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            outcome.finished = True
        delta = choice.get("delta")
        text += str((delta.get("content") if isinstance(delta, dict) else choice.get("text")) or "")
    return text


class _SurrogateJoiner:
    """Holds back a lone high surrogate (half of a JSON-escaped emoji split
    across two events) until its other half comes."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, piece: str) -> str:
        text = self._held + piece
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if text else ""

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


# -- errors ----------------------------------------------------------------------------
class _Rejected(Exception):
    """The server refused this form of the request (HTTP 400/422)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    detail = (await resp.text())[:300]
    log.warning("model server answered HTTP %d to %s: %s", resp.status, resp.url.path, detail)
    raise GenerationError(_status_sentence(resp.status), retryable=resp.status == 429 or resp.status >= 500)


def _status_sentence(status: int) -> str:
    if status in (401, 403):
        return "the model server refused the bot's API key"
    if status == 404:
        return "the model server does not serve the configured model"
    if status in (400, 413, 422):
        return "the model server rejected the request (the conversation may be too long)"
    if status == 429 or status == 503:
        return "the model server is overloaded"
    return f"the model server failed (HTTP {status})"


class _TransportErrors:
    """Turns transport errors into one clear :class:`GenerationError`."""

    def __init__(self, timeout: float, *, streaming: bool = False) -> None:
        self._timeout = timeout
        self._streaming = streaming

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        if exc is None or isinstance(exc, (GenerationError, _Rejected)):
            return
        sentence = self._sentence(exc)
        if sentence is None:
            return
        log.warning("model server request failed: %s: %s", type(exc).__name__, exc)
        raise GenerationError(sentence, retryable=True) from exc

    def _sentence(self, exc: BaseException) -> str | None:
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return f"the model server did not answer within {self._timeout:g} s"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return "the model server cannot be reached"
        if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)) or (
            self._streaming and isinstance(exc, (aiohttp.ClientError, ConnectionError))
        ):
            return "the model server stopped in the middle of the reply"
        if isinstance(exc, (aiohttp.ClientError, ConnectionError)):
            return "the model server cannot be reached"
        return None

"""A fake OpenAI-compatible server on 127.0.0.1 (port 0) for the failure cases.

It speaks the real wire protocol (``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` with SSE streaming) and misbehaves on request:
``behaviour`` is one of

- ``"ok"``: streams ``pieces`` then ``finish_reason`` and ``[DONE]``;
- ``"status"``: answers HTTP ``status`` before any byte of the reply;
- ``"cut"``: streams ``cut_after`` pieces, then drops the connection;
- ``"slow_first_byte"``: waits ``delay`` seconds before the response headers;
- ``"stall"``: sends headers and one piece, then nothing for ``delay`` seconds;
- ``"reject_ids"``: like ``ok``, but answers 422 to a prompt of token ids
  or to unknown fields, as ``transformers serve`` does.

With ``split_bytes`` the body is written one byte at a time, so a multi-byte
character arrives split across TCP packets.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STANDARD_FIELDS = {
    "model",
    "prompt",
    "stream",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "generation_config",
    "messages",
}


@dataclass
class FakeOpenAIServer:
    behaviour: str = "ok"
    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "."])
    status: int = 500
    cut_after: int = 2
    delay: float = 5.0
    split_bytes: bool = False
    #: False: the stream ends (cleanly) without a finish_reason or ``[DONE]``.
    send_end: bool = True
    model: str = "fake-model"
    api_key: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: Set when a client went away before the reply was finished.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeOpenAIServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if self.behaviour == "reject_ids" and (
            not isinstance(body.get("prompt", ""), str) or set(body) - STANDARD_FIELDS
        ):
            return web.json_response({"detail": "prompt must be a string."}, status=422)
        if self.behaviour == "status":
            return web.json_response({"error": {"message": "boom"}}, status=self.status)
        if self.behaviour == "slow_first_byte":
            await asyncio.sleep(self.delay)
        return await self._stream(request, chat="messages" in body)

    async def _stream(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self.pieces):
                if self.behaviour == "cut" and i == self.cut_after:
                    assert request.transport is not None
                    request.transport.close()  # a server restart: no final chunk
                    return resp
                await self._send(resp, _chunk(piece, None, chat))
                if self.behaviour == "stall":
                    await asyncio.sleep(self.delay)
            if self.send_end:
                await self._send(resp, _chunk("", "stop", chat))
                await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        await resp.write_eof()
        return resp

    async def _send(self, resp: web.StreamResponse, event: dict[str, Any]) -> None:
        data = f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        if not self.split_bytes:
            await resp.write(data)
            return
        for b in data:
            await resp.write(bytes([b]))
            await asyncio.sleep(0)


def _chunk(text: str, finish: str | None, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    return {"id": "x", "object": "text_completion", "model": "fake-model", "choices": [choice]}


# -- a real server: `transformers serve` with the embedded model -----------------------
#: Where the converted model is kept between runs (git-ignored).
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / ".cache" / "openai-server-smollm2"


def embedded_model_dir(cache: Path = EMBEDDED_DIR) -> Path:
    """The embedded SmolLM2 GGUF as a plain transformers folder (config,
    tokenizer, bfloat16 safetensors), made once under ``cache``.

    ``transformers serve`` cannot serve the GGUF itself (its config has no
    ``architectures``); the bot's own converted copy is float32, this one is
    bfloat16 for speed."""
    import torch

    from bot.engine import embedded

    gguf = embedded.embedded_model_file()
    target = embedded.copy_path(gguf, cache)
    if not (target / embedded.MARK).is_file():
        embedded.convert(gguf, target, dtype=torch.bfloat16, progress=None)
    return target


@dataclass
class TransformersServe:
    """``transformers serve <model_dir>`` on 127.0.0.1, on a port the OS picks."""

    model_dir: Path
    log_path: Path
    threads: int = 1
    start_timeout: float = 300.0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    base_url: str = ""
    start_s: float = 0.0

    def start(self) -> TransformersServe:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [
            sys.executable,
            "-c",
            "from transformers.cli.transformers import main; main()",
            "serve",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--log-level",
            "info",
        ]
        started = time.monotonic()
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.base_url = self._wait_for_port(started)
        self.start_s = time.monotonic() - started
        return self

    def _wait_for_port(self, started: float) -> str:
        assert self.process is not None
        while time.monotonic() - started < self.start_timeout:
            text = self.log_path.read_text(errors="replace")
            if found := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text):
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"transformers serve did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

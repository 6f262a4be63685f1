"""A fake Slack for end-to-end tests, on 127.0.0.1 with a free port.

- Web API at ``api_base_url`` (``AsyncWebClient(base_url=...)``): ``auth.test``,
  ``chat.postMessage``, ``chat.update``, ``chat.delete``, ``chat.postEphemeral``, ``users.info``,
  ``conversations.info``, ``apps.connections.open``, the assistant thread
  methods (``assistant.threads.setStatus`` / ``setSuggestedPrompts`` /
  ``setTitle``) and native streaming (``chat.startStream`` / ``appendStream`` /
  ``stopStream``: a stream takes text until it is stopped, then answers
  ``message_not_in_streaming_state``). Every call is recorded in
  :attr:`FakeSlack.calls`, in order, with its parameters. A method named in
  :attr:`FakeSlack.errors` answers that error instead (``unknown_method`` the
  way Slack does, with ``req_method``, before any token check).
- ``response_url`` endpoints (``/response/<id>``) for slash-command replies,
  recorded in :attr:`FakeSlack.responses`.
- A Socket Mode websocket at ``/socket``: sends ``hello`` on connect, then the
  envelopes a test pushes with :meth:`FakeSlack.send_envelope`; acks from the
  app are recorded in :attr:`FakeSlack.acks`. aiohttp answers pings.
- :func:`signed_headers` / :func:`event_body` / :func:`command_body` build
  requests that the real bolt app accepts in HTTP mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.file_host import FileHost, FileRequest

JSON = dict[str, Any]


@dataclass
class ApiCall:
    method: str
    params: JSON
    token: str
    at: float
    #: The error the fake answered with ("" when it succeeded).
    error: str = ""


@dataclass
class FakeSlack:
    bot_token: str = "xoxb-test-token"
    app_token: str = "xapp-test-token"
    team_id: str = "T1"
    bot_user_id: str = "UBOT"
    bot_id: str = "BBOT"
    scopes: tuple[str, ...] = (
        "app_mentions:read",
        "chat:write",
        "channels:history",
        "groups:history",
        "im:history",
        "commands",
        "users:read",
        "files:read",
        "assistant:write",
    )
    users: dict[str, str] = field(default_factory=lambda: {"U1": "aki", "U2": "ben", "UADMIN": "root"})
    channels: dict[str, str] = field(default_factory=lambda: {"C1": "general", "C2": "random"})
    calls: list[ApiCall] = field(default_factory=list)
    #: method -> error it answers (e.g. {"chat.startStream": "unknown_method"}).
    errors: dict[str, str] = field(default_factory=dict)
    #: Every message the bot made, by ts, in order: channel, thread_ts, text, streaming.
    messages: dict[str, JSON] = field(default_factory=dict)
    responses: list[JSON] = field(default_factory=list)
    acks: list[JSON] = field(default_factory=list)
    #: Refuse blocks holding ``feedback_buttons`` (invalid_blocks), as a Slack without them would.
    refuse_feedback_buttons: bool = False
    port: int = 0
    _runner: web.AppRunner | None = None
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    # Attached files, as files.slack.com serves them (url_private_download).
    file_host: FileHost = field(default_factory=FileHost)
    #: Web API method -> how many more calls to answer with ``ok: false``.
    _failing: dict[str, int] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{rid}", self._response_url)
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/files-pri/{tail:.*}", self._file)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        assert sockets
        self.port = int(sockets[0].getsockname()[1])

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base_url(self) -> str:
        return f"{self.base}/api/"

    def response_url(self) -> str:
        return f"{self.base}/response/{uuid.uuid4().hex}"

    # ------------------------------------------------------------ queries

    def fail(self, method: str, count: int = 1) -> None:
        """Answer the next ``count`` calls of ``method`` with ``internal_error``
        (a storm when ``count`` is large)."""
        self._failing[method] = count

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def posted(self) -> list[JSON]:
        """Parameters of every chat.postMessage, in order."""
        return [c.params for c in self.calls_to("chat.postMessage") if not c.error]

    def thread(self, channel: str, thread_ts: str | None) -> list[str]:
        """Latest text of each message the bot posted or streamed in a thread, in order."""
        return [
            str(m["text"])
            for ts, m in self.messages.items()
            if m["channel"] == channel and m["thread_ts"] == thread_ts and ts not in self.deleted
        ]

    def message_texts(self) -> dict[str, str]:
        """The latest text of each message the bot posted or streamed (and did not delete), by ts."""
        return {ts: str(m["text"]) for ts, m in self.messages.items() if ts not in self.deleted}

    def message_blocks(self) -> dict[str, list[JSON]]:
        """The latest blocks of each message the bot posted, by ts."""
        blocks: dict[str, list[JSON]] = {}
        for call in self.calls:
            ts = call.params.get("_ts") if call.method == "chat.postMessage" else call.params.get("ts")
            has_blocks = "blocks" in call.params and not call.error
            if call.method in ("chat.postMessage", "chat.update", "chat.stopStream") and has_blocks:
                raw = call.params["blocks"]
                blocks[str(ts)] = json.loads(raw) if isinstance(raw, str) else list(raw or [])
        return blocks

    def buttons(self, ts: str) -> dict[str, str]:
        """The interactive elements under a message: action_id (or, for feedback
        buttons, ``action_id:up``/``:down``) -> value."""
        out: dict[str, str] = {}
        for block in self.message_blocks().get(ts, []):
            for element in block.get("elements", []):
                if element.get("type") == "feedback_buttons":
                    out[element["action_id"] + ":up"] = element["positive_button"]["value"]
                    out[element["action_id"] + ":down"] = element["negative_button"]["value"]
                elif "action_id" in element:
                    out[element["action_id"]] = element.get("value", "")
        return out

    # ------------------------------------------------------------ Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params = await _params(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = token or str(params.get("token", ""))
        handler = self._handlers().get(method)
        call = ApiCall(method, params, token, time.monotonic())
        if handler is None or self.errors.get(method) == "unknown_method":
            self.calls.append(call)
            return web.json_response({"ok": False, "error": "unknown_method", "req_method": method})
        self.calls.append(call)
        if method in self.errors:
            return web.json_response({"ok": False, "error": self.errors[method]})
        if method == "apps.connections.open":
            if token != self.app_token:
                return web.json_response({"ok": False, "error": "invalid_auth"})
        elif token != self.bot_token:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if self._failing.get(method, 0) > 0:
            self._failing[method] -= 1
            return web.json_response({"ok": False, "error": "internal_error"})
        if self.refuse_feedback_buttons and "feedback_buttons" in json.dumps(params.get("blocks") or []):
            call.error = "invalid_blocks"
            return web.json_response({"ok": False, "error": call.error})
        body = handler(call)
        headers = {"x-oauth-scopes": ",".join(self.scopes)} if method == "auth.test" else {}
        return web.json_response(body, headers=headers)

    def _handlers(self) -> dict[str, Callable[[ApiCall], JSON]]:
        return {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.delete": self._delete,
            "chat.postEphemeral": self._post_ephemeral,
            "users.info": self._users_info,
            "conversations.info": self._conversations_info,
            "conversations.replies": self._conversations_replies,
            "conversations.history": self._conversations_history,
            "apps.connections.open": self._connections_open,
            "assistant.threads.setStatus": self._assistant_thread,
            "assistant.threads.setSuggestedPrompts": self._assistant_thread,
            "assistant.threads.setTitle": self._assistant_thread,
            "chat.startStream": self._start_stream,
            "chat.appendStream": self._append_stream,
            "chat.stopStream": self._stop_stream,
        }

    def _auth_test(self, call: ApiCall) -> JSON:
        return {
            "ok": True,
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "team_id": self.team_id,
            "user": "xwin",
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _post_message(self, call: ApiCall) -> JSON:
        ts = self._next_ts()
        call.params["_ts"] = ts
        self._new_message(ts, call.params, str(call.params.get("text", "")), streaming=False)
        message = {"type": "message", "text": call.params.get("text", ""), "ts": ts, "bot_id": self.bot_id}
        return {"ok": True, "channel": call.params.get("channel"), "ts": ts, "message": message}

    def _delete(self, call: ApiCall) -> JSON:
        self.deleted.add(str(call.params.get("ts")))
        return {"ok": True, "channel": call.params.get("channel"), "ts": call.params.get("ts")}

    def _update(self, call: ApiCall) -> JSON:
        ts = str(call.params.get("ts"))
        message = self.messages.get(ts)
        if ts in self.deleted or message is None or message["channel"] != call.params.get("channel"):
            return {"ok": False, "error": "message_not_found"}
        message["text"] = str(call.params.get("text", ""))
        return {"ok": True, "channel": call.params.get("channel"), "ts": call.params.get("ts")}

    def _new_message(self, ts: str, params: JSON, text: str, *, streaming: bool) -> None:
        thread_ts = params.get("thread_ts") or None
        self.messages[ts] = {"channel": params.get("channel"), "thread_ts": thread_ts, "text": text,
                             "streaming": streaming}

    def _assistant_thread(self, call: ApiCall) -> JSON:
        if not call.params.get("channel_id") or not call.params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True}

    def _start_stream(self, call: ApiCall) -> JSON:
        if not call.params.get("channel") or not call.params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        ts = self._next_ts()
        self._new_message(ts, call.params, _stream_text(call.params), streaming=True)
        return {"ok": True, "channel": call.params["channel"], "ts": ts}

    def _append_stream(self, call: ApiCall) -> JSON:
        message = self._streaming(call)
        if message is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += _stream_text(call.params)
        return {"ok": True, "channel": call.params["channel"], "ts": call.params["ts"]}

    def _stop_stream(self, call: ApiCall) -> JSON:
        message = self._streaming(call)
        if message is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += _stream_text(call.params)
        message["streaming"] = False
        ts = str(call.params["ts"])
        final = {"type": "message", "text": message["text"], "ts": ts, "bot_id": self.bot_id,
                 "thread_ts": message["thread_ts"], "streaming_state": "completed"}
        return {"ok": True, "channel": call.params["channel"], "ts": ts, "message": final}

    def _streaming(self, call: ApiCall) -> JSON | None:
        message = self.messages.get(str(call.params.get("ts")))
        if message is None or not message["streaming"] or message["channel"] != call.params.get("channel"):
            return None
        return message

    def _post_ephemeral(self, call: ApiCall) -> JSON:
        return {"ok": True, "message_ts": self._next_ts()}

    def _users_info(self, call: ApiCall) -> JSON:
        uid = str(call.params.get("user", ""))
        if uid not in self.users:
            return {"ok": False, "error": "user_not_found"}
        name = self.users[uid]
        return {
            "ok": True,
            "user": {
                "id": uid,
                "name": name,
                "real_name": name.title(),
                "profile": {"display_name": name, "real_name": name.title()},
            },
        }

    def _conversations_info(self, call: ApiCall) -> JSON:
        cid = str(call.params.get("channel", ""))
        if cid not in self.channels:
            return {"ok": False, "error": "channel_not_found"}
        return {"ok": True, "channel": {"id": cid, "name": self.channels[cid]}}

    def _conversations_replies(self, call: ApiCall) -> JSON:
        """A thread's messages (the bot's: the fake keeps no others), oldest first."""
        channel, ts = call.params.get("channel"), str(call.params.get("ts") or "")
        found = [t for t, m in self.messages.items() if m["channel"] == channel and ts in (t, m["thread_ts"])]
        return self._history_page(found, call)

    def _conversations_history(self, call: ApiCall) -> JSON:
        """A conversation's top-level messages (the bot's), newest first."""
        channel = call.params.get("channel")
        found = [t for t, m in self.messages.items() if m["channel"] == channel and not m["thread_ts"]]
        return self._history_page(found[::-1], call)

    def _history_page(self, found: list[str], call: ApiCall) -> JSON:
        blocks = self.message_blocks()
        limit = int(call.params.get("limit") or 100)
        messages = [{"type": "message", "ts": t, "text": self.messages[t]["text"], "bot_id": self.bot_id,
                     "user": self.bot_user_id, "thread_ts": self.messages[t]["thread_ts"], "blocks": blocks.get(t, [])}
                    for t in found if t not in self.deleted]
        return {"ok": True, "messages": messages[:limit], "has_more": len(messages) > limit}

    def _connections_open(self, call: ApiCall) -> JSON:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}

    # ------------------------------------------------------------ files

    def file(self, name: str, data: bytes, mimetype: str, *, base_url: str = "") -> JSON:
        """A file object for a message event's ``files``, served (with the bot
        token only) at ``base_url``, by default this server."""
        fid = f"F{next(self._ts):06d}"
        path = f"/files-pri/{self.team_id}-{fid}/{name}"
        self.file_host.add(path + "/download", data, mimetype)
        base = base_url or self.base
        return {
            "id": fid, "name": name, "title": name, "mimetype": mimetype, "size": len(data),
            "mode": "hosted", "url_private": base + path, "url_private_download": base + path + "/download",
        }

    async def _file(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token != self.bot_token:
            # Slack answers an unauthorized download with its sign-in page.
            self.file_host.requests.append(FileRequest(request.path, dict(request.headers)))
            return web.Response(text="<html>Sign in to Slack</html>", content_type="text/html")
        return await self.file_host.serve(request)

    # ------------------------------------------------------------ response_url

    async def _response_url(self, request: web.Request) -> web.Response:
        body = await request.json()
        body["_rid"] = request.match_info["rid"]
        self.responses.append(body)
        return web.Response(text="ok")

    # ------------------------------------------------------------ Socket Mode

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps(_hello()))
        self._connected.set()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.acks.append(json.loads(msg.data))
        finally:
            self._sockets.remove(ws)
            if not self._sockets:
                self._connected.clear()
        return ws

    async def kill_sockets(self) -> None:
        """Close every Socket Mode websocket, as Slack does before it refuses an
        app (set ``errors["apps.connections.open"]`` to refuse the reconnect)."""
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)

    async def wait_connected(self, within: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), within)

    async def send_envelope(self, payload: JSON, *, kind: str = "events_api", retry_attempt: int = 0) -> str:
        """Push one envelope to the connected app; returns its envelope_id."""
        await self.wait_connected()
        envelope_id = uuid.uuid4().hex
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
        }
        await self._sockets[-1].send_str(json.dumps(envelope))
        return envelope_id

    async def ask_to_reconnect(self) -> None:
        """A ``disconnect`` message: the app opens a new session (as Slack asks every few hours)."""
        await self.wait_connected()
        await self._sockets[-1].send_str(json.dumps({"type": "disconnect", "reason": "refresh_requested"}))

    def acked(self, envelope_id: str) -> bool:
        return any(a.get("envelope_id") == envelope_id for a in self.acks)


def _hello() -> JSON:
    return {
        "type": "hello",
        "num_connections": 1,
        "debug_info": {"host": "fake", "approximate_connection_time": 3600},
        "connection_info": {"app_id": "A1"},
    }


async def _params(request: web.Request) -> JSON:
    params: JSON = dict(request.query)  # slack-sdk sends some methods' params in the query
    if request.method == "GET":
        return params
    if request.content_type == "application/json":
        data = await request.json()
        return {**params, **data} if isinstance(data, dict) else params
    form = await request.post()
    return {**params, **{k: v for k, v in form.items() if isinstance(v, str)}}


def _stream_text(params: JSON) -> str:
    """The text a streaming call adds: ``markdown_text`` and markdown_text chunks."""
    text = str(params.get("markdown_text") or "")
    chunks = params.get("chunks") or []
    if isinstance(chunks, str):
        chunks = json.loads(chunks)
    return text + "".join(str(c.get("text", "")) for c in chunks if c.get("type") == "markdown_text")


# ---------------------------------------------------------------- requests


def signed_headers(secret: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """Headers Slack would send with ``body``, signed with ``secret``."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + ts.encode() + b":" + body
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}


def event_body(event: JSON, *, team_id: str = "T1", event_id: str | None = None) -> JSON:
    """An Events API ``event_callback`` body around ``event``."""
    return {
        "token": "legacy-verification-token",
        "team_id": team_id,
        "api_app_id": "A1",
        "event": event,
        "type": "event_callback",
        "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(),
        "event_time": int(time.time()),
        "authorizations": [{"team_id": team_id, "user_id": "UBOT", "is_bot": True}],
    }


def command_form(
    text: str,
    *,
    user_id: str,
    channel_id: str,
    response_url: str,
    team_id: str = "T1",
    command: str = "/xwin",
) -> dict[str, str]:
    """A slash command's fields, as Slack posts them."""
    return {
        "token": "legacy-verification-token",
        "team_id": team_id,
        "team_domain": "fake",
        "channel_id": channel_id,
        "channel_name": "directmessage" if channel_id.startswith("D") else "general",
        "user_id": user_id,
        "user_name": user_id.lower(),
        "command": command,
        "text": text,
        "api_app_id": "A1",
        "response_url": response_url,
        "trigger_id": "trig-" + uuid.uuid4().hex[:8],
    }


def block_action(
    action_id: str,
    value: str,
    *,
    user: str,
    channel: str,
    message_ts: str,
    thread_ts: str | None,
    response_url: str,
    team_id: str = "T1",
    kind: str = "button",
) -> JSON:
    """A ``block_actions`` interaction: a button pressed under a bot message
    (Socket Mode sends it as is; HTTP mode posts it form-encoded, see
    :func:`form_body`)."""
    message: JSON = {"type": "message", "ts": message_ts, "bot_id": "BBOT", "text": ""}
    if thread_ts:
        message["thread_ts"] = thread_ts
    payload = {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "fake"},
        "user": {"id": user, "username": user.lower(), "team_id": team_id},
        "api_app_id": "A1",
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
        "trigger_id": "trig-" + uuid.uuid4().hex[:8],
        "channel": {"id": channel, "name": "general"},
        "message": message,
        "response_url": response_url,
        "actions": [{
            "type": kind, "action_id": action_id, "block_id": "b1", "value": value,
            "action_ts": f"{time.time():.6f}",
        }],
    }
    return payload


def form_body(payload: JSON) -> bytes:
    """An interaction payload as Slack posts it over HTTP."""
    return urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()


def command_body(**kwargs: Any) -> bytes:
    return urllib.parse.urlencode(command_form(**kwargs)).encode()


async def poll(
    check: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` holds, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)

"""A fake Slack for end-to-end tests, on 127.0.0.1 with a free port.

- Web API at ``api_base_url`` (``AsyncWebClient(base_url=...)``): ``auth.test``,
  ``chat.postMessage``, ``chat.update``, ``chat.postEphemeral``, ``users.info``,
  ``conversations.info``, ``apps.connections.open``. Every call is recorded in
  :attr:`FakeSlack.calls`, in order, with its parameters.
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

from aiohttp import WSMsgType, web

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
    )
    users: dict[str, str] = field(default_factory=lambda: {"U1": "aki", "U2": "ben", "UADMIN": "root"})
    channels: dict[str, str] = field(default_factory=lambda: {"C1": "general", "C2": "random"})
    calls: list[ApiCall] = field(default_factory=list)
    responses: list[JSON] = field(default_factory=list)
    acks: list[JSON] = field(default_factory=list)
    #: Refuse blocks holding ``feedback_buttons`` (invalid_blocks), as a Slack without them would.
    refuse_feedback_buttons: bool = False
    port: int = 0
    _runner: web.AppRunner | None = None
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{rid}", self._response_url)
        app.router.add_get("/socket", self._socket)
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

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def posted(self) -> list[JSON]:
        """Parameters of every chat.postMessage, in order."""
        return [c.params for c in self.calls_to("chat.postMessage") if not c.error]

    def message_texts(self) -> dict[str, str]:
        """The latest text of each message the bot posted, by ts."""
        texts: dict[str, str] = {}
        for call in self.calls:
            if call.error:
                continue
            if call.method == "chat.postMessage":
                texts[call.params["_ts"]] = str(call.params.get("text", ""))
            elif call.method == "chat.update":
                texts[str(call.params["ts"])] = str(call.params.get("text", ""))
        return texts

    def message_blocks(self) -> dict[str, list[JSON]]:
        """The latest blocks of each message the bot posted, by ts."""
        blocks: dict[str, list[JSON]] = {}
        for call in self.calls:
            ts = call.params.get("_ts") if call.method == "chat.postMessage" else call.params.get("ts")
            if call.method in ("chat.postMessage", "chat.update") and "blocks" in call.params and not call.error:
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
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        call = ApiCall(method, params, token, time.monotonic())
        self.calls.append(call)
        if method == "apps.connections.open":
            if token != self.app_token:
                return web.json_response({"ok": False, "error": "invalid_auth"})
        elif token != self.bot_token:
            return web.json_response({"ok": False, "error": "invalid_auth"})
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
            "chat.postEphemeral": self._post_ephemeral,
            "users.info": self._users_info,
            "conversations.info": self._conversations_info,
            "apps.connections.open": self._connections_open,
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
        message = {"type": "message", "text": call.params.get("text", ""), "ts": ts, "bot_id": self.bot_id}
        return {"ok": True, "channel": call.params.get("channel"), "ts": ts, "message": message}

    def _update(self, call: ApiCall) -> JSON:
        return {"ok": True, "channel": call.params.get("channel"), "ts": call.params.get("ts")}

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

    def _connections_open(self, call: ApiCall) -> JSON:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}

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
    if request.method == "GET":
        return dict(request.query)
    if request.content_type == "application/json":
        data = await request.json()
        return dict(data) if isinstance(data, dict) else {}
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


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

"""A fake Discord (REST API + gateway websocket) that discord.py logs in to for real.

It listens on 127.0.0.1, port 0, and records every REST request and every
gateway frame the client sends, so tests assert on what the bot *sent*.

It behaves like Discord where discord.py notices:

- JSON responses carry ``Content-Type: application/json`` exactly;
- a wrong token gets 401 on ``GET /users/@me``;
- IDENTIFY with a privileged intent the fake is told to refuse gets close code 4014;
- a message over 2000 characters or without content is refused with 400;
- a 429 (queued with :meth:`FakeDiscord.rate_limit`) carries a ``Via`` header, as
  Discord's own do (discord.py treats a 429 without one as a Cloudflare ban);
- a thread started from a message has the message's id, and ``THREAD_CREATE``
  is dispatched to the client;
- :meth:`FakeDiscord.stall` makes matching requests hang unanswered (an API that
  stalls) until the fake closes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.file_host import FileHost

DISCORD_EPOCH_MS = 1420070400000
MANAGE_CHANNELS = 1 << 4
MESSAGE_CONTENT_INTENT = 1 << 15
Json = dict[str, Any]
Handler = Callable[[web.Request, "Recorded"], Awaitable[web.Response]]


@dataclass
class Recorded:
    """One REST request the client made, and the status the fake answered."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]
    status: int = 0

    @property
    def json(self) -> Json:
        return self.body if isinstance(self.body, dict) else {}


@dataclass
class _RateLimit:
    method: str
    pattern: re.Pattern[str]
    count: int
    retry_after: float


@dataclass
class FakeMessage:
    id: str
    channel_id: str
    content: str
    author: Json
    history: list[str] = field(default_factory=list)
    components: list[Json] = field(default_factory=list)

    def custom_ids(self) -> list[str]:
        """The custom ids of the buttons under this message, in order."""
        return [c["custom_id"] for row in self.components for c in row.get("components", [])]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response with exactly ``application/json`` (discord.py checks the header verbatim)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(body=json.dumps(data).encode(), status=status, headers=all_headers)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


class FakeDiscord:
    """The fake. ``async with FakeDiscord() as fake:`` then point the client at
    :attr:`api_base_url` and :attr:`gateway_url`."""

    def __init__(
        self,
        *,
        token: str = "test-token",
        heartbeat_interval_ms: int = 41250,
        refuse_message_content: bool = False,
    ) -> None:
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.refuse_message_content = refuse_message_content
        self._ids = itertools.count(1)
        self.bot_user = self.user("xwin", bot=True)
        self.application_id = self.snowflake()
        self.guilds: dict[str, Json] = {}
        self.messages: dict[str, FakeMessage] = {}
        self.requests: list[Recorded] = []
        self.gateway_received: list[Json] = []
        self.gateway_sent: list[Json] = []
        self._rate_limits: list[_RateLimit] = []
        self._forbidden: list[tuple[str, re.Pattern[str]]] = []
        self._stalled: list[tuple[str, re.Pattern[str]]] = []
        self._unstall = asyncio.Event()
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        # Attachments, as the CDN serves them (outside /api, no token needed).
        self.cdn = FileHost()

    # ------------------------------------------------------------------ ids and objects

    def snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) + next(self._ids))

    def user(self, name: str, *, bot: bool = False) -> Json:
        return {
            "id": self.snowflake(),
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
        }

    def add_guild(self, name: str = "guild") -> Json:
        gid = self.snowflake()
        guild: Json = {
            "id": gid,
            "name": name,
            "icon": None,
            "owner_id": self.snowflake(),
            "roles": [self.role_payload(gid, "@everyone", permissions=0)],
            "channels": [],
            "threads": [],
            "members": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "member_count": 2,
            "large": False,
            "unavailable": False,
            "joined_at": iso_now(),
            "voice_states": [],
            "presences": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
        }
        self.guilds[gid] = guild
        return guild

    def role_payload(self, role_id: str, name: str, *, permissions: int) -> Json:
        return {
            "id": role_id,
            "name": name,
            "permissions": str(permissions),
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": True,
        }

    def add_role(self, guild: Json, name: str, permissions: int = 0) -> Json:
        role = self.role_payload(self.snowflake(), name, permissions=permissions)
        guild["roles"].append(role)
        return role

    def add_channel(self, guild: Json, name: str = "general") -> Json:
        channel: Json = {
            "id": self.snowflake(),
            "type": 0,
            "guild_id": guild["id"],
            "name": name,
            "position": len(guild["channels"]),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        guild["channels"].append(channel)
        return channel

    def find_channel(self, channel_id: str) -> tuple[Json | None, Json | None]:
        """(guild, channel or thread) for an id, or (None, None)."""
        for guild in self.guilds.values():
            for channel in guild["channels"] + guild["threads"]:
                if channel["id"] == channel_id:
                    return guild, channel
        return None, None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{tail:.*}", self.cdn.serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        self._unstall.set()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        try:
            await self._send(ws, {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                await self._on_frame(ws, json.loads(msg.data))
        finally:
            self._sockets.remove(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, frame: Json) -> None:
        self.gateway_sent.append(frame)
        await ws.send_str(json.dumps(frame))

    async def _on_frame(self, ws: web.WebSocketResponse, frame: Json) -> None:
        self.gateway_received.append(frame)
        op = frame.get("op")
        if op == 1:
            await self._send(ws, {"op": 11})
        elif op == 2:
            await self._identify(ws, frame["d"])
        elif op == 6:  # RESUME
            await self._dispatch_on(ws, "RESUMED", {})

    async def _identify(self, ws: web.WebSocketResponse, data: Json) -> None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if self.refuse_message_content and int(data.get("intents", 0)) & MESSAGE_CONTENT_INTENT:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
            "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.application_id, "flags": 0},
        }
        await self._dispatch_on(ws, "READY", ready)
        for guild in self.guilds.values():
            await self._dispatch_on(ws, "GUILD_CREATE", guild)

    async def _dispatch_on(self, ws: web.WebSocketResponse, event: str, data: Json) -> None:
        self._seq += 1
        await self._send(ws, {"op": 0, "t": event, "s": self._seq, "d": data})

    async def dispatch(self, event: str, data: Json) -> None:
        """Send a gateway event to every connected client."""
        for ws in list(self._sockets):
            await self._dispatch_on(ws, event, data)

    async def ask_to_reconnect(self) -> None:
        """Gateway op 7 RECONNECT: clients reconnect and RESUME their session."""
        for ws in list(self._sockets):
            await self._send(ws, {"op": 7, "d": None})

    def identified(self) -> bool:
        return any(f.get("op") == 2 for f in self.gateway_received)

    # ------------------------------------------------------------------ events a test sends

    def member_payload(self, user: Json, roles: list[str] | None = None, permissions: int = 0) -> Json:
        return {
            "user": user,
            "roles": roles or [],
            "joined_at": iso_now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "permissions": str(permissions),
        }

    async def user_message(
        self,
        channel_id: str,
        content: str,
        author: Json,
        *,
        mentions: list[Json] | None = None,
        guild_id: str | None = None,
        attachments: list[Json] | None = None,
        roles: list[str] | None = None,
    ) -> str:
        """A user posts ``content``; ``mentions`` are the users it mentions (Discord
        sends them in the payload: discord.py does not parse ``<@id>``);
        ``attachments`` are payloads from :meth:`attachment`; ``roles`` are the
        author's role ids in the guild."""
        mid = self.snowflake()
        data: Json = {
            "id": mid,
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": mentions or [],
            "mention_roles": [],
            "attachments": attachments or [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if guild_id is not None:
            data["guild_id"] = guild_id
            data["member"] = {k: v for k, v in self.member_payload(author, roles).items() if k != "user"}
        self.messages[mid] = FakeMessage(mid, channel_id, content, author)
        await self.dispatch("MESSAGE_CREATE", data)
        return mid

    def attachment(self, name: str, data: bytes, content_type: str | None, *, base_url: str = "") -> Json:
        """An attachment payload whose URL the fake CDN serves (at ``base_url``,
        by default this server)."""
        aid = self.snowflake()
        path = f"/attachments/{aid}/{name}"
        self.cdn.add(path, data, content_type or "application/octet-stream")
        url = (base_url or self.base_url) + path
        payload: Json = {"id": aid, "filename": name, "size": len(data), "url": url, "proxy_url": url}
        if content_type is not None:
            payload["content_type"] = content_type
        return payload

    async def delete_message(self, channel_id: str, message_id: str, guild_id: str | None = None) -> None:
        data: Json = {"id": message_id, "channel_id": channel_id}
        if guild_id is not None:
            data["guild_id"] = guild_id
        self.messages.pop(message_id, None)
        await self.dispatch("MESSAGE_DELETE", data)

    async def slash_command(
        self,
        subcommand: str,
        options: dict[str, Any] | None = None,
        *,
        user: Json,
        channel_id: str,
        guild_id: str | None = None,
        permissions: int = 0,
        roles: list[str] | None = None,
    ) -> str:
        """``/xwin <subcommand> <options>``; returns the interaction token."""
        sub: Json = {
            "name": subcommand,
            "type": 1,
            "options": [_option(k, v) for k, v in (options or {}).items()],
        }
        data = {"id": self.snowflake(), "name": "xwin", "type": 1, "options": [sub]}
        return await self._interaction(2, data, user, channel_id, guild_id, permissions, roles)

    async def click(
        self,
        message_id: str,
        custom_id: str,
        *,
        user: Json,
        guild_id: str | None = None,
        permissions: int = 0,
    ) -> str:
        """A user presses the button ``custom_id`` under a message; returns the
        interaction token. Discord checks that the message has that button."""
        message = self.messages[message_id]
        assert custom_id in message.custom_ids(), (custom_id, message.custom_ids())
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._interaction(
            3, data, user, message.channel_id, guild_id, permissions, None,
            message=self._message_payload(message),
        )

    async def _interaction(
        self,
        kind: int,
        data: Json,
        user: Json,
        channel_id: str,
        guild_id: str | None,
        permissions: int,
        roles: list[str] | None,
        **extra: Any,
    ) -> str:
        """Dispatch INTERACTION_CREATE (2: a command, 3: a component); returns its token."""
        token = f"itoken-{self.snowflake()}"
        payload: Json = {
            "id": self.snowflake(),
            "application_id": self.application_id,
            "type": kind,
            "token": token,
            "version": 1,
            "channel_id": channel_id,
            "data": data,
            "locale": "en-US",
            "app_permissions": "0",
            "entitlements": [],
            "authorizing_integration_owners": {},
            "attachment_size_limit": 8 * 1024 * 1024,
            "context": 0 if guild_id else 1,
            **extra,
        }
        _guild, channel = self.find_channel(channel_id)
        payload["channel"] = channel or {"id": channel_id, "type": 1, "recipients": [user]}
        if guild_id is not None:
            payload["guild_id"] = guild_id
            payload["guild_locale"] = "en-US"
            payload["member"] = self.member_payload(user, roles, permissions)
        else:
            payload["user"] = user
        await self.dispatch("INTERACTION_CREATE", payload)
        return token

    # ------------------------------------------------------------------ what the bot sent

    def rate_limit(self, method: str, path_regex: str, *, count: int = 1, retry_after: float = 0.05) -> None:
        """Answer the next ``count`` matching requests with a 429 (with ``Via``)."""
        self._rate_limits.append(_RateLimit(method, re.compile(path_regex), count, retry_after))

    def forbid(self, method: str, path_regex: str) -> None:
        """Answer matching requests with 403 Missing Permissions from now on."""
        self._forbidden.append((method, re.compile(path_regex)))

    def stall(self, method: str, path_regex: str) -> None:
        """Leave matching requests unanswered from now on (until the fake closes)."""
        self._stalled.append((method, re.compile(path_regex)))

    def sent(self, method: str | None = None, path_regex: str = "") -> list[Recorded]:
        pattern = re.compile(path_regex)
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and pattern.search(r.path) and r.status < 300
        ]

    def bot_messages(self, channel_id: str) -> list[FakeMessage]:
        """Messages the bot posted in a channel, in order, with their final content."""
        return [
            m
            for m in self.messages.values()
            if m.channel_id == channel_id and m.author["id"] == self.bot_user["id"]
        ]

    # ------------------------------------------------------------------ REST

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        record = Recorded(
            request.method, path, dict(request.query), await _body(request), dict(request.headers)
        )
        self.requests.append(record)
        if any(m == record.method and p.search(record.path) for m, p in self._stalled):
            await self._unstall.wait()
        response = (
            self._maybe_rate_limit(record)
            or self._maybe_forbid(record)
            or await self._route(request, record, path)
        )
        record.status = response.status
        return response

    def _maybe_forbid(self, record: Recorded) -> web.Response | None:
        for method, pattern in self._forbidden:
            if method == record.method and pattern.search(record.path):
                return json_response({"message": "Missing Permissions", "code": 50013}, 403)
        return None

    def _maybe_rate_limit(self, record: Recorded) -> web.Response | None:
        for limit in self._rate_limits:
            if limit.count > 0 and limit.method == record.method and limit.pattern.search(record.path):
                limit.count -= 1
                body = {
                    "message": "You are being rate limited.",
                    "retry_after": limit.retry_after,
                    "global": False,
                }
                headers = {
                    "Via": "1.1 google",
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset-After": str(limit.retry_after),
                    "X-RateLimit-Bucket": "fake-bucket",
                    "X-RateLimit-Scope": "user",
                }
                return json_response(body, 429, headers)
        return None

    async def _route(self, request: web.Request, record: Recorded, path: str) -> web.Response:
        # Interaction callbacks and webhooks carry no Authorization; everything else must be right.
        auth = request.headers.get("Authorization")
        needs_auth = not path.startswith(("/interactions/", "/webhooks/"))
        if needs_auth and auth != f"Bot {self.token}":
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and method == request.method:
                return await handler(record, *match.groups())
        return json_response({"message": "404: Not Found", "code": 0}, 404)

    def _routes(self) -> list[tuple[str, str, Callable[..., Awaitable[web.Response]]]]:
        return [
            ("GET", r"/users/@me", self._get_me),
            ("GET", r"/oauth2/applications/@me", self._get_app),
            ("PUT", r"/applications/(\d+)/commands", self._put_commands),
            ("PUT", r"/applications/(\d+)/guilds/(\d+)/commands", self._put_commands),
            ("GET", r"/channels/(\d+)/messages", self._get_messages),
            ("POST", r"/channels/(\d+)/messages", self._post_message),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", self._patch_message),
            ("DELETE", r"/channels/(\d+)/messages/(\d+)", self._delete_message),
            ("POST", r"/channels/(\d+)/messages/(\d+)/threads", self._post_thread),
            ("POST", r"/channels/(\d+)/typing", self._typing),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._callback),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/@original", self._patch_original),
            ("POST", r"/webhooks/(\d+)/([^/]+)", self._followup),
        ]

    async def _get_me(self, record: Recorded) -> web.Response:
        return json_response(self.bot_user)

    async def _get_app(self, record: Recorded) -> web.Response:
        return json_response(
            {
                "id": self.application_id,
                "name": "xwin",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.user("owner"),
                "verify_key": "0" * 64,
                "flags": 0,
                "summary": "",
                "team": None,
            }
        )

    async def _put_commands(self, record: Recorded, app_id: str, *rest: str) -> web.Response:
        commands = record.body if isinstance(record.body, list) else []
        out = [{**c, "id": self.snowflake(), "application_id": app_id, "version": "1"} for c in commands]
        return json_response(out)

    def _message_payload(self, message: FakeMessage, flags: int = 0) -> Json:
        return {
            "id": message.id,
            "channel_id": message.channel_id,
            "author": message.author,
            "content": message.content,
            "timestamp": iso_now(),
            "edited_timestamp": iso_now() if message.history else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": message.components,
            "pinned": False,
            "type": 0,
            "flags": flags,
        }

    def _bad_content(self, body: Json) -> web.Response | None:
        content = body.get("content")
        if content is not None and len(content) > 2000:
            return json_response({"message": "Invalid Form Body", "code": 50035}, 400)
        return None

    async def _get_messages(self, record: Recorded, channel_id: str) -> web.Response:
        """A channel's history, newest first (``?limit=``; ``before``/``after`` are not needed)."""
        limit = int(record.query.get("limit", "50"))
        here = [m for m in self.messages.values() if m.channel_id == channel_id]
        return json_response([self._message_payload(m) for m in reversed(here)][:limit])

    async def _post_message(self, record: Recorded, channel_id: str) -> web.Response:
        body = record.json
        if not body.get("content", "").strip() and not body.get("embeds"):
            return json_response({"message": "Cannot send an empty message", "code": 50006}, 400)
        bad = self._bad_content(body)
        if bad is not None:
            return bad
        message = FakeMessage(self.snowflake(), channel_id, body["content"], self.bot_user)
        message.components = body.get("components") or []
        self.messages[message.id] = message
        return json_response(self._message_payload(message))

    async def _patch_message(self, record: Recorded, channel_id: str, message_id: str) -> web.Response:
        message = self.messages.get(message_id)
        if message is None or message.channel_id != channel_id:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        bad = self._bad_content(record.json)
        if bad is not None:
            return bad
        if "content" in record.json:
            message.history.append(message.content)
            message.content = record.json["content"]
        if "components" in record.json:
            message.components = record.json["components"] or []
        return json_response(self._message_payload(message))

    async def _delete_message(self, record: Recorded, channel_id: str, message_id: str) -> web.Response:
        if self.messages.pop(message_id, None) is None:
            return json_response({"message": "Unknown Message", "code": 10008}, 404)
        return web.Response(status=204)

    async def _post_thread(self, record: Recorded, channel_id: str, message_id: str) -> web.Response:
        guild, parent = self.find_channel(channel_id)
        if guild is None or parent is None or message_id not in self.messages:
            return json_response({"message": "Unknown Channel", "code": 10003}, 404)
        if any(t["id"] == message_id for t in guild["threads"]):
            return json_response({"message": "A thread has already been created", "code": 160004}, 400)
        thread = self._thread_payload(guild, channel_id, message_id, record.json.get("name", "thread"))
        guild["threads"].append(thread)
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return json_response(thread)

    def _thread_payload(self, guild: Json, parent_id: str, thread_id: str, name: str) -> Json:
        return {
            "id": thread_id,
            "type": 11,
            "guild_id": guild["id"],
            "parent_id": parent_id,
            "name": name,
            "owner_id": self.bot_user["id"],
            "member_count": 1,
            "message_count": 0,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": iso_now(),
                "locked": False,
            },
        }

    async def _typing(self, record: Recorded, channel_id: str) -> web.Response:
        return web.Response(status=204)

    async def _callback(self, record: Recorded, interaction_id: str, token: str) -> web.Response:
        flags = int(record.json.get("data", {}).get("flags", 0) or 0)
        return json_response(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": 2,
                    "response_message_loading": record.json.get("type") == 5,
                    "response_message_ephemeral": bool(flags & 64),
                }
            }
        )

    def interaction_replies(self, token: str) -> list[Recorded]:
        """Everything the bot sent back for one interaction (callback, edits, follow-ups)."""
        return [r for r in self.requests if token in r.path and r.status < 300]

    def interaction_text(self, token: str) -> str:
        """The content of the bot's answer to an interaction ("" until it answers)."""
        texts = [
            r.json.get("content") or r.json.get("data", {}).get("content") or ""
            for r in self.interaction_replies(token)
        ]
        return "\n".join(t for t in texts if t)

    async def _patch_original(self, record: Recorded, app_id: str, token: str) -> web.Response:
        return await self._webhook_message(record)

    async def _followup(self, record: Recorded, app_id: str, token: str) -> web.Response:
        return await self._webhook_message(record)

    async def _webhook_message(self, record: Recorded) -> web.Response:
        bad = self._bad_content(record.json)
        if bad is not None:
            return bad
        message = FakeMessage(self.snowflake(), "0", record.json.get("content", ""), self.bot_user)
        return json_response(self._message_payload(message, int(record.json.get("flags", 0) or 0)))


def _option(name: str, value: Any) -> Json:
    kind = (
        5
        if isinstance(value, bool)
        else 4
        if isinstance(value, int)
        else 10
        if isinstance(value, float)
        else 3
    )
    return {"name": name, "type": kind, "value": value}


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    text = await request.text()
    if request.content_type == "application/json":
        return json.loads(text)
    return text


async def wait_for(predicate: Callable[[], Any], *, within: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"timed out after {within}s waiting for {getattr(predicate, '__name__', predicate)}"
            )
        await asyncio.sleep(interval)

"""The Slack adapter: slack-bolt's ``AsyncApp`` (Socket Mode or HTTP) in front
of the core, every event through the event boundary."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp, AsyncAssistant
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.context.say.async_say import AsyncSay
from slack_bolt.context.set_suggested_prompts.async_set_suggested_prompts import AsyncSetSuggestedPrompts
from slack_bolt.context.set_title.async_set_title import AsyncSetTitle
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters import strings
from adapters.boundary import EventBoundary
from adapters.files import Downloader
from adapters.slack.api import JSON, _error_of
from adapters.slack.blocks import CONTINUE_ACTION, FEEDBACK_ACTION, REGENERATE_ACTION, BlockSupport
from adapters.slack.events import (
    _USER_SUBTYPES,
    _dm_key,
    _Identity,
    _Message,
    _PanelContexts,
    _suggested_prompt,
    _title,
    _ts_seconds,
    panel_command,
)
from adapters.slack.sink import MESSAGE_LIMIT, PanelReplySink, SlackReplySink, StreamSupport
from adapters.slack_format import mentioned_channels, mentioned_users, readable_text, split_message, to_mrkdwn
from bot.adapter import Core
from bot.config import Secrets, SlackConfig
from bot.errors import AdapterError
from bot.types import (
    ActionSink,
    CommandContext,
    CommandReply,
    ConversationKey,
    Incoming,
    ReplyAction,
    ReplySink,
)

log = logging.getLogger(__package__)  # one logger per platform: "adapters.slack"

#: Scopes the bot cannot work without, and the ones that only degrade it.
REQUIRED_SCOPES = ("app_mentions:read", "chat:write")
DM_SCOPE = "im:history"
OPTIONAL_SCOPES = ("channels:history", "users:read", "files:read", "assistant:write")
_SEEN_EVENTS = 2048
_CONNECT_TIMEOUT = 30.0
_EVENTS_PATH = "/slack/events"
#: Messages read back to find the one a reply ends in (``continue``): a DM's
#: newest, a thread's oldest (a panel thread rarely has more).
_HISTORY_LIMIT = 50
_REPLIES_LIMIT = 1000
_MAX_AGE = 5 * 60  # seconds a signed request stays valid (Slack's advice)
#: Where attached files are downloaded from (with the bot token); nowhere else.
FILE_ORIGINS = ("https://files.slack.com",)
#: Errors of apps.connections.open that retrying cannot heal: the adapter ends
#: (and the process with it) instead of reconnecting forever.
_CONNECT_REFUSED = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
    "not_allowed_token_type", "missing_scope", "no_permission", "app_uninstalled",
})


class _ConnectionsClient(AsyncWebClient):
    """The web client Socket Mode asks for a new websocket URL each time it
    reconnects. slack-sdk retries a refusal forever; this one reports a refusal
    that cannot heal (a revoked app token, say) to ``refused`` first."""

    def __init__(self, refused: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._refused = refused

    async def apps_connections_open(self, *, app_token: str, **kwargs: Any) -> Any:
        try:
            return await super().apps_connections_open(app_token=app_token, **kwargs)
        except SlackApiError as exc:
            error = _error_of(exc)
            if error in _CONNECT_REFUSED:
                self._refused(error)
            raise


class SlackAdapter:
    """Slack in front of the core: ``await start()``, then ``await close()``."""

    def __init__(
        self,
        bot: Core,
        config: SlackConfig,
        secrets: Secrets,
        *,
        file_origins: Sequence[str] = FILE_ORIGINS,
    ) -> None:
        self._bot = bot
        self._events = EventBoundary("slack", log, lambda: bot.metrics.error("adapter"))
        self._config = config
        self._bot_token = secrets.slack_bot_token
        self._app_token = secrets.slack_app_token
        self._signing_secret = secrets.slack_signing_secret
        self._update_interval = bot.config.bot.stream_interval
        self._client = AsyncWebClient(token=self._bot_token or None, base_url=config.api_base_url)
        self._client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
        self._files = Downloader(
            "Slack", file_origins, timeout=bot.config.attachments.download_timeout,
            headers={"Authorization": f"Bearer {self._bot_token}"},
        )
        self._app: AsyncApp | None = None
        self._identity = _Identity("", "", "", frozenset())
        self._names: dict[str, str] = {}
        self._channel_names: dict[str, str] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._streams = StreamSupport(config.native_streaming)
        self._panel_contexts = _PanelContexts()
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._ended: asyncio.Future[None] | None = None  # done on close() or on losing Slack for good
        self._blocks = BlockSupport()
        bot.register_platform("slack", self.sink_for)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Check the tokens and scopes, then connect (Socket Mode) or listen (HTTP).

        Raises :class:`AdapterError` with one sentence saying what to fix.
        """
        self._check_secrets()
        self._ended = asyncio.get_running_loop().create_future()
        self._identity = await self._auth_test()
        self._check_scopes(self._identity.scopes)
        app = self._app = self._build_app()
        if self._config.mode == "socket":
            await self._start_socket(app)
        else:
            await self._start_http(app)
        log.info("slack: connected as %s in team %s (%s mode)", self._identity.user_id,
                 self._identity.team_id, self._config.mode)

    async def wait_closed(self) -> None:
        """Until :meth:`close`; raises :class:`AdapterError` when Slack refuses
        the Socket Mode connection for good (slack-sdk reconnects after passing
        faults: a dropped socket, a network error, a 5xx)."""
        if self._ended is not None:
            await asyncio.shield(self._ended)

    def _connection_refused(self, error: str) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_exception(AdapterError(
                f"Slack: SLACK_APP_TOKEN was refused while reconnecting Socket Mode ({error}); "
                "check or regenerate the app-level token."
            ))

    async def close(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlackAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def not_ready(self) -> str | None:
        """For /readyz: None while the Socket Mode websocket is open (or HTTP mode listens)."""
        if self._socket is not None:
            connected = await self._socket.client.is_connected()  # type: ignore[no-untyped-call]
            return None if connected else "the Socket Mode websocket is not connected"
        return None if self._runner is not None else "not connected"

    @property
    def http_port(self) -> int:
        """The port HTTP mode listens on (useful when configured as 0)."""
        return self._port

    def sink_for(self, key: ConversationKey, reply_ref: dict[str, str]) -> ReplySink:
        """Sink factory for jobs resumed after a restart."""
        channel = reply_ref.get("channel") or key.channel
        if reply_ref.get("panel"):
            return self._panel_sink(channel, key.thread, reply_ref.get("user", ""), reply_ref.get("team", ""))
        thread_ts = reply_ref.get("thread_ts", key.thread)
        if reply_ref.get("edit_ts"):  # a Continue: go on editing the reply
            return self._sink(channel, thread_ts, resume=[reply_ref["edit_ts"]],
                              skip=int(reply_ref.get("skip") or 0), continuing=True)
        shown = [ts for ts in reply_ref.get("messages", "").split(",") if ts]
        return self._sink(channel, thread_ts, resume=shown)

    def _panel_sink(self, channel: str, thread_ts: str, user: str, team: str) -> PanelReplySink:
        return PanelReplySink(self._client, channel, thread_ts, user=user, team=team, streams=self._streams,
                              update_interval=self._update_interval, support=self._blocks)

    def _sink(self, channel: str, thread_ts: str, *, resume: Sequence[str] = (), skip: int = 0,
              continuing: bool = False) -> SlackReplySink:
        return SlackReplySink(self._client, channel, thread_ts, update_interval=self._update_interval,
                              resume=resume, skip=skip, continuing=continuing, support=self._blocks)

    # ------------------------------------------------------------ start-up checks

    def _check_secrets(self) -> None:
        if not self._bot_token.startswith("xoxb-"):
            what = "is not set" if not self._bot_token else "is not a bot token (xoxb-...)"
            raise AdapterError(f"Slack: SLACK_BOT_TOKEN {what}; copy the Bot User OAuth Token of your app.")
        if self._config.mode == "socket" and not self._app_token.startswith("xapp-"):
            what = "is not set" if not self._app_token else "is not an app-level token (xapp-...)"
            raise AdapterError(
                f"Slack: SLACK_APP_TOKEN {what}; Socket Mode needs an app-level token with "
                "connections:write (or set [slack] mode = \"http\")."
            )
        if self._config.mode == "http" and not self._signing_secret:
            raise AdapterError(
                "Slack: SLACK_SIGNING_SECRET is not set; HTTP mode needs the app's signing secret."
            )

    async def _auth_test(self) -> _Identity:
        try:
            resp = await self._client.auth_test()
        except SlackApiError as exc:
            error = _error_of(exc)
            raise AdapterError(f"Slack: SLACK_BOT_TOKEN was refused by auth.test ({error}); "
                               "check or reinstall the app's bot token.") from None
        except (SlackClientError, OSError) as exc:
            raise AdapterError(f"Slack: cannot reach {self._config.api_base_url} ({exc}).") from None
        scopes = resp.headers.get("x-oauth-scopes") or resp.headers.get("X-OAuth-Scopes") or ""
        return _Identity(
            team_id=str(resp.get("team_id", "")),
            user_id=str(resp.get("user_id", "")),
            bot_id=str(resp.get("bot_id", "")),
            scopes=frozenset(s.strip() for s in str(scopes).split(",") if s.strip()),
        )

    def _check_scopes(self, scopes: frozenset[str]) -> None:
        if not scopes:
            return  # the server did not say; Slack's does
        needed = list(REQUIRED_SCOPES) + ([DM_SCOPE] if self._config.allow_dms else [])
        missing = [s for s in needed if s not in scopes]
        if missing:
            raise AdapterError(f"Slack: the bot token lacks the scope(s) {', '.join(missing)}; "
                               "add them under OAuth & Permissions and reinstall the app.")
        for scope in OPTIONAL_SCOPES:
            if scope not in scopes:
                log.warning("slack: the bot token lacks %s; %s", scope, _OPTIONAL_WHY[scope])

    async def _start_socket(self, app: AsyncApp) -> None:
        try:
            # Asked here, not inside connect(), which retries a refused token forever.
            resp = await self._client.apps_connections_open(app_token=self._app_token)
        except SlackApiError as exc:
            error = _error_of(exc)
            raise AdapterError(
                f"Slack: SLACK_APP_TOKEN was refused by apps.connections.open ({error}); "
                "enable Socket Mode and use an app-level token with connections:write."
            ) from None
        connections = _ConnectionsClient(self._connection_refused, token=None,
                                         base_url=self._config.api_base_url)
        handler = AsyncSocketModeHandler(app, app_token=self._app_token, logger=log, web_client=connections)
        handler.client.wss_uri = str(resp["url"])
        _count_reconnects(handler.client, lambda: self._bot.metrics.reconnected("slack"))
        self._socket = handler
        try:
            # connect() retries a failing websocket forever: bound the first try.
            await asyncio.wait_for(handler.connect_async(), _CONNECT_TIMEOUT)  # type: ignore[no-untyped-call]
        except TimeoutError:
            await self.close()
            raise AdapterError(
                f"Slack: the Socket Mode websocket did not open within {_CONNECT_TIMEOUT:.0f} s; "
                "check the network path to Slack (or use [slack] mode = \"http\")."
            ) from None

    async def _start_http(self, app: AsyncApp) -> None:
        secret = self._signing_secret.encode()

        async def dispatch(request: web.Request) -> web.Response:
            # The signature first, on the raw bytes: bolt parses the body before
            # it checks, and logs the whole body of each refused request (issue 9).
            body = await request.read()
            if not _signed(secret, body, request.headers):
                log.warning("slack: refused a request with a missing or bad signature (%d bytes)", len(body))
                return web.Response(status=401)
            try:
                bolt_request = AsyncBoltRequest(
                    body=body.decode("utf-8"), query=request.query_string, headers=dict(request.headers)
                )
            except (ValueError, AttributeError, TypeError) as exc:  # bad UTF-8 or JSON, "[1]"
                log.warning("slack: refused a signed request with a malformed body (%s)", type(exc).__name__)
                return web.Response(status=400)
            return await to_aiohttp_response(await app.async_dispatch(bolt_request))

        web_app = web.Application()
        web_app.router.add_post(_EVENTS_PATH, dispatch)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._config.http_host, self._config.http_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise AdapterError(f"Slack: cannot listen on {self._config.http_host}:{self._config.http_port} "
                               f"({exc.strerror}); change [slack] http_host / http_port.") from None
        self._runner = runner
        self._port = _bound_port(site, self._config.http_port)

    # ------------------------------------------------------------ bolt app

    def _build_app(self) -> AsyncApp:
        http = self._config.mode == "http"
        app = AsyncApp(
            client=self._client,
            signing_secret=self._signing_secret if http else None,
            request_verification_enabled=http,
            process_before_response=False,
            logger=log,
            name="xwin-bot",
        )
        assistant = AsyncAssistant(thread_context_store=self._panel_contexts, logger=log)
        assistant.thread_started(self._on_panel_started)
        assistant.user_message(self._on_panel_message)
        app.use(self._panel_deletions)  # before the assistant middleware, which swallows them
        app.use(assistant)  # thread_context_changed: bolt's default saves it to _PanelContexts
        app.event("app_mention")(self._on_mention)
        app.event("message")(self._on_message)
        app.command("/xwin")(self._on_command)
        for action_id in (CONTINUE_ACTION, REGENERATE_ACTION, FEEDBACK_ACTION):
            app.action(action_id)(self._on_button)
        app.action(re.compile(f"^{FEEDBACK_ACTION}_(up|down)$"))(self._on_button)  # the plain-button fallback
        return app

    async def _on_mention(self, event: JSON, body: JSON) -> None:
        msg = _Message.of(event, body)
        if not self._fresh(body) or self._ignored(msg):
            return
        if msg.is_dm:
            await self._guarded(msg, self._on_dm)
            return
        await self._guarded(msg, self._on_channel_mention)

    async def _on_message(self, event: JSON, body: JSON) -> None:
        msg = _Message.of(event, body)
        if msg.subtype == "message_deleted":
            await self._on_deleted(event, msg)
            return
        if not self._fresh(body) or self._ignored(msg):
            return
        if msg.is_dm:
            await self._guarded(msg, self._on_dm)
        elif msg.thread_ts and not self._mentions_me(msg.text):
            await self._guarded(msg, self._on_thread_message)
        # A mention is answered from its app_mention event, not this one.

    async def _on_command(self, ack: AsyncAck, command: JSON, respond: AsyncRespond) -> None:
        await ack()

        async def run() -> None:
            reply = await self._run_command(command)
            await _respond(respond, reply.text, "ephemeral" if reply.ephemeral else "in_channel")

        what = f"/xwin in {command.get('channel_id', '?')}"
        await self._events.run(run(), what, tell=lambda text: _respond(respond, text, "ephemeral"))

    # ------------------------------------------------------------ the assistant panel

    async def _on_panel_started(
        self, event: JSON, body: JSON, say: AsyncSay, set_suggested_prompts: AsyncSetSuggestedPrompts
    ) -> None:
        thread = event.get("assistant_thread") or {}
        team = str(body.get("team_id") or "")
        if not self._fresh(body) or not self._allowed(team, str(thread.get("channel_id", "")), True):
            return
        what = f"greeting panel thread {thread.get('thread_ts')}"
        await self._events.run(self._greet(thread, say, set_suggested_prompts), what)

    async def _greet(self, thread: JSON, say: AsyncSay, set_suggested_prompts: AsyncSetSuggestedPrompts) -> None:
        try:
            if self._config.assistant_greeting.strip():
                await say(text=to_mrkdwn(self._config.assistant_greeting), unfurl_links=False)
            prompts = [_suggested_prompt(p) for p in self._config.suggested_prompts]
            if prompts:
                await set_suggested_prompts(prompts=prompts)
        except SlackApiError as exc:
            log.warning("slack: greeting panel thread %s failed: %s", thread.get("thread_ts"), _error_of(exc))

    async def _panel_deletions(self, body: JSON, next: Callable[[], Awaitable[None]]) -> None:
        """A question deleted in a panel (DM) thread cancels its reply, as elsewhere."""
        event = body.get("event") or {}
        previous = event.get("previous_message") or {}
        if (event.get("type") == "message" and event.get("subtype") == "message_deleted"
                and event.get("channel_type") == "im" and previous.get("thread_ts")):
            await self._on_deleted(event, _Message.of(event, body))
        await next()

    async def _on_panel_message(self, event: JSON, body: JSON, set_title: AsyncSetTitle) -> None:
        msg = _Message.of(event, body)
        if not self._fresh(body) or self._ignored(msg):
            return

        async def answer(msg: _Message) -> None:
            await self._on_panel_thread(msg, set_title)

        await self._guarded(msg, answer)

    async def _on_panel_thread(self, msg: _Message, set_title: AsyncSetTitle) -> None:
        key = ConversationKey("slack", "dm", msg.channel, msg.thread_ts)
        command = panel_command(msg.text)
        if command is not None:
            ctx = CommandContext(key=key, author_id=msg.user, is_dm=True,
                                 is_admin=msg.user in self._config.admin_users)
            if command.lower() == "continue":  # the reply itself shows that it goes on
                reply = await self._continue_last(ctx, msg.channel, msg.thread_ts)
                if reply.ok:
                    return
            else:
                reply = await self._bot.command(ctx, command)
            await self._say(msg.channel, msg.thread_ts, to_mrkdwn(reply.text))
            return
        first = not await self._bot.knows_conversation(key)
        sink = self._panel_sink(msg.channel, msg.thread_ts, msg.user, msg.team)
        ref = {"panel": "1", "user": msg.user, "team": msg.team}
        result = await self._handle(msg, key, msg.thread_ts, sink=sink, ref=ref)
        if first and result != "duplicate":
            try:
                await set_title(_title(await self._readable(msg.text)))
            except SlackApiError as exc:
                log.warning("slack: assistant.threads.setTitle in %s failed: %s", msg.channel, _error_of(exc))

    async def _say(self, channel: str, thread_ts: str, text: str) -> None:
        try:
            await self._client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text,
                                                unfurl_links=False, link_names=False)
        except SlackApiError as exc:
            log.warning("slack: chat.postMessage in %s failed: %s", channel, _error_of(exc))

    async def _on_button(self, ack: AsyncAck, body: JSON, action: JSON, respond: AsyncRespond) -> None:
        """A button under a reply: acked at once (Slack wants it within 3 s),
        then the core decides; the presser gets one ephemeral line."""
        await ack()

        async def answer(text: str) -> None:
            await _respond(respond, text, "ephemeral")

        async def press() -> None:
            await answer(await self._press(body, action))

        channel = (body.get("channel") or {}).get("id", "?")
        await self._events.run(press(), f"button {action.get('action_id')} in {channel}", tell=answer)

    async def _press(self, body: Mapping[str, Any], action: Mapping[str, Any]) -> str:
        what, _, number = str(action.get("value") or "").rpartition(":")
        what = what or ("continue" if action.get("action_id") == CONTINUE_ACTION else "regenerate")
        team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
        channel = str((body.get("channel") or {}).get("id") or "")
        user = str((body.get("user") or {}).get("id") or "")
        message = body.get("message") or {}
        is_dm = channel.startswith("D")
        if not number.isdigit() or not self._allowed(team, channel, is_dm) or not self._permitted(user):
            return strings.NOT_HERE
        thread = str(message.get("thread_ts") or "")
        key = await self._pressed_in(team, channel, thread, is_dm)
        press = ReplyAction(key, int(number), user, is_admin=user in self._config.admin_users)
        if what in ("up", "down"):
            return (await self._bot.feedback(press, "up" if what == "up" else "down")).text
        if what == "continue":
            make_sink = self._continuing(channel, thread, str(message.get("ts") or ""))
            return (await self._bot.continue_reply(press, make_sink)).text

        in_panel = is_dm and bool(key.thread)  # an assistant panel thread: the new reply streams

        def new_reply(shown: str) -> tuple[ReplySink, dict[str, str]]:
            if in_panel:
                return self._panel_sink(channel, thread, user, team), {"panel": "1", "user": user, "team": team}
            return self._sink(channel, thread), {"channel": channel, "thread_ts": thread}

        return (await self._bot.regenerate(press, new_reply)).text

    async def _pressed_in(self, team: str, channel: str, thread: str, is_dm: bool) -> ConversationKey:
        """The conversation of a button: a channel's thread; in a DM, the assistant
        panel thread when it is one (each is its own conversation), else the DM."""
        if not is_dm:
            return ConversationKey("slack", team, channel, thread)
        panel = ConversationKey("slack", "dm", channel, thread)
        return panel if thread and await self._bot.knows_conversation(panel) else _dm_key(channel)

    async def _continue_last(self, ctx: CommandContext, channel: str, thread: str) -> CommandReply:
        """``continue`` (a panel message, ``/xwin continue`` in a DM): the newest
        reply of the conversation goes on, editing the message it ends in."""
        reply_id = await self._bot.last_reply_id(ctx.key)
        last_ts = None if reply_id is None else await self._last_message_of(channel, thread, reply_id)
        make_sink = self._continuing(channel, thread, last_ts)
        return await self._bot.continue_last(ctx.key, ctx.author_id, ctx.is_admin, make_sink)

    def _continuing(self, channel: str, thread: str, last_ts: str | None) -> ActionSink:
        """The sink of a Continue: it goes on editing the reply's last message
        ``last_ts`` (new messages if that one is gone, or ``None``: not found)."""

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            ref = {"channel": channel, "thread_ts": thread}
            skip = max(0, len(split_message(to_mrkdwn(shown), MESSAGE_LIMIT)) - 1)  # messages before the last
            if not last_ts:  # new messages, from the reply's last part on
                return self._sink(channel, thread, skip=skip), ref
            ref.update(edit_ts=last_ts, skip=str(skip))
            return self._sink(channel, thread, resume=[last_ts], skip=skip, continuing=True), ref

        return make_sink

    async def _last_message_of(self, channel: str, thread: str, reply_id: int) -> str | None:
        """The ts of the message that ends reply ``reply_id``: the bot's newest one
        in the thread (or the DM) with that reply's Continue button; None if none
        is found or the history cannot be read."""
        try:
            if thread:  # oldest first, the thread's start included
                found = await self._client.conversations_replies(channel=channel, ts=thread, limit=_REPLIES_LIMIT)
            else:  # newest first
                found = await self._client.conversations_history(channel=channel, limit=_HISTORY_LIMIT)
        except SlackApiError as exc:
            log.info("slack: cannot read the messages of %s (%s); continuing in a new message",
                     channel, _error_of(exc))
            return None
        messages = [m for m in found.get("messages") or [] if isinstance(m, Mapping)]
        ours = [m for m in messages if m.get("bot_id") == self._identity.bot_id
                and _has_button(m, CONTINUE_ACTION, str(reply_id))]
        return str(max(ours, key=lambda m: _ts_seconds(str(m.get("ts"))))["ts"]) if ours else None

    # ------------------------------------------------------------ events

    def _fresh(self, body: Mapping[str, Any]) -> bool:
        """False for an event already seen (Slack's retries carry the same event_id)."""
        event_id = str(body.get("event_id") or "")
        if not event_id:
            return True
        if event_id in self._seen:
            log.debug("slack: event %s delivered again; ignored", event_id)
            return False
        self._seen[event_id] = None
        while len(self._seen) > _SEEN_EVENTS:
            self._seen.popitem(last=False)
        return True

    def _ignored(self, msg: _Message) -> bool:
        """Bots (this one included), edits and other non-user messages, and
        places outside the allowlists: dropped before any work."""
        if msg.from_bot or not msg.user or msg.user == self._identity.user_id:
            return True
        if msg.subtype not in _USER_SUBTYPES:
            return True
        return not self._allowed(msg.team, msg.channel, msg.is_dm) or not self._permitted(msg.user)

    def _allowed(self, team: str, channel: str, is_dm: bool) -> bool:
        cfg = self._config
        if cfg.teams and team not in cfg.teams:
            return False
        if is_dm:
            return cfg.allow_dms
        return not cfg.channels or channel in cfg.channels

    def _permitted(self, user: str) -> bool:
        """Access by user id: ``blocked_users``, then ``allowed_users`` (empty = everyone)."""
        cfg = self._config
        return user not in cfg.blocked_users and (not cfg.allowed_users or user in cfg.allowed_users)

    def _mentions_me(self, text: str) -> bool:
        return bool(self._identity.user_id) and f"<@{self._identity.user_id}" in text

    async def _guarded(self, msg: _Message, handler: Callable[[_Message], Awaitable[object]]) -> None:
        """One message event through the error boundary (the user is told in its thread)."""
        sink = self._sink(msg.channel, msg.thread_ts or ("" if msg.is_dm else msg.ts))
        await self._events.run(handler(msg), f"message {msg.ts} in {msg.channel}", tell=sink.fail)

    async def _on_channel_mention(self, msg: _Message) -> None:
        thread = msg.thread_ts or msg.ts
        key = ConversationKey("slack", msg.team, msg.channel, thread)
        await self._handle(msg, key, thread)

    async def _on_thread_message(self, msg: _Message) -> None:
        key = ConversationKey("slack", msg.team, msg.channel, msg.thread_ts)
        if await self._bot.knows_conversation(key):
            await self._handle(msg, key, msg.thread_ts)

    async def _on_dm(self, msg: _Message) -> None:
        await self._handle(msg, _dm_key(msg.channel), msg.thread_ts)

    async def _on_deleted(self, event: Mapping[str, Any], msg: _Message) -> None:
        what = f"cancelling the reply to a message deleted in {msg.channel}"
        await self._events.run(self._cancel_reply(event, msg), what)

    async def _cancel_reply(self, event: Mapping[str, Any], msg: _Message) -> None:
        previous = event.get("previous_message") or {}
        ts = str(previous.get("ts") or event.get("deleted_ts") or "")
        if not ts or not self._allowed(msg.team, msg.channel, msg.is_dm):
            return
        thread = str(previous.get("thread_ts") or ts)
        if msg.is_dm:  # a DM thread (a panel chat) is its own conversation
            key = ConversationKey("slack", "dm", msg.channel, str(previous.get("thread_ts") or ""))
        else:
            key = ConversationKey("slack", msg.team, msg.channel, thread)
        if await self._bot.cancel_message(key, ts):
            log.info("slack: message %s deleted; its reply was cancelled", ts)

    async def _handle(
        self,
        msg: _Message,
        key: ConversationKey,
        reply_thread: str,
        *,
        sink: ReplySink | None = None,
        ref: Mapping[str, str] | None = None,
    ) -> object:
        incoming = Incoming(
            key=key,
            message_id=msg.ts,
            author_id=msg.user,
            author_name=await self._user_name(msg.user),
            text=await self._readable(msg.text),
            is_dm=msg.is_dm,
            created_at=_ts_seconds(msg.ts),
            reply_ref={"channel": msg.channel, "thread_ts": reply_thread, **(ref or {})},
            files=msg.files,
        )
        result = await self._bot.handle(incoming, sink or self._sink(msg.channel, reply_thread), self._files)
        log.debug("slack: message %s in %s: %s", msg.ts, msg.channel, result)
        return result

    # ------------------------------------------------------------ commands

    async def _run_command(self, command: Mapping[str, Any]) -> CommandReply:
        team = str(command.get("team_id", ""))
        channel = str(command.get("channel_id", ""))
        user = str(command.get("user_id", ""))
        is_dm = channel.startswith("D") or command.get("channel_name") == "directmessage"
        if not self._allowed(team, channel, is_dm) or not self._permitted(user):
            return CommandReply(strings.NOT_HERE, ok=False)
        key = _dm_key(channel) if is_dm else ConversationKey("slack", team, channel, "")
        ctx = CommandContext(key=key, author_id=user, is_dm=is_dm, is_admin=user in self._config.admin_users)
        text = str(command.get("text", "")).strip()
        if text.lower() == "continue":
            if not is_dm:  # a channel's conversations are threads, and the command names none
                return CommandReply(strings.SLACK_CONTINUE_IN_THREAD, ok=False)
            return await self._continue_last(ctx, channel, "")
        return await self._bot.command(ctx, text)

    # ------------------------------------------------------------ markup → text

    async def _readable(self, text: str) -> str:
        users = {uid: await self._user_name(uid) for uid in mentioned_users(text)}
        for cid in mentioned_channels(text):
            await self._channel_name(cid)
        return readable_text(text, bot_user_id=self._identity.user_id, user_names=users,
                             channel_names=self._channel_names)

    async def _user_name(self, user_id: str) -> str:
        if user_id not in self._names:
            self._names[user_id] = await self._lookup_user(user_id)
        return self._names[user_id]

    async def _lookup_user(self, user_id: str) -> str:
        try:
            resp = await self._client.users_info(user=user_id)
        except SlackClientError as exc:
            log.debug("slack: users.info %s failed: %s", user_id, exc)
            return user_id
        user = resp.get("user") or {}
        profile = user.get("profile") or {}
        names = (profile.get("display_name"), profile.get("real_name"), user.get("name"))
        return str(next((n for n in names if n), user_id))

    async def _channel_name(self, channel_id: str) -> str:
        if channel_id not in self._channel_names:
            try:
                resp = await self._client.conversations_info(channel=channel_id)
                self._channel_names[channel_id] = str((resp.get("channel") or {}).get("name") or channel_id)
            except SlackClientError as exc:
                log.debug("slack: conversations.info %s failed: %s", channel_id, exc)
                self._channel_names[channel_id] = channel_id
        return self._channel_names[channel_id]


_OPTIONAL_WHY = {
    "channels:history": "follow-ups in a thread need a mention of the bot.",
    "users:read": "people are shown to the model by their ids, not their names.",
    "files:read": "files attached to messages cannot be read.",
    "assistant:write": "the assistant panel (greeting, prompts, status, titles) will not work.",
}


def _has_button(message: Mapping[str, Any], action_id: str, value: str) -> bool:
    """Whether a message's blocks hold the button ``action_id`` with ``value``."""
    return any(isinstance(element, Mapping) and element.get("action_id") == action_id
               and element.get("value") == value
               for block in message.get("blocks") or [] if isinstance(block, Mapping)
               for element in block.get("elements") or [])


async def _respond(respond: AsyncRespond, text: str, response_type: str) -> None:
    """Answer a command or a button through its response_url."""
    try:
        await respond(text=to_mrkdwn(text), response_type=response_type, replace_original=False)
    except (SlackClientError, OSError) as exc:
        log.warning("slack: could not answer through the response_url: %s", exc)


def _signed(secret: bytes, body: bytes, headers: Mapping[str, str]) -> bool:
    """Slack's v0 signature over the raw bytes, fresh within five minutes.
    (slack_sdk's SignatureVerifier raises on a timestamp that is not a number
    and on a body that is not UTF-8.)"""
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    signature = headers.get("X-Slack-Signature", "")
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(time.time() - int(timestamp)) > _MAX_AGE:
        return False
    mac = hmac.new(secret, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256)
    return hmac.compare_digest(f"v0={mac.hexdigest()}".encode(), signature.encode("utf-8", "replace"))


def _count_reconnects(client: Any, on_reconnect: Callable[[], None]) -> None:
    """Call ``on_reconnect`` each time the Socket Mode client opens a session
    after its first (slack_sdk has no hook for it: its ``connect`` is wrapped)."""
    connect = client.connect
    sessions = 0

    async def counted() -> None:
        nonlocal sessions
        await connect()
        sessions += 1
        if sessions > 1:
            on_reconnect()

    client.connect = counted


def _bound_port(site: web.TCPSite, configured: int) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else configured

"""The Slack adapter: slack-bolt's ``AsyncApp`` in front of the platform-free core.

Socket Mode by default (no public URL), HTTP mode as an option (bolt checks
each request's signature). It turns ``app_mention`` events, follow-ups in the
bot's threads and DMs into :class:`~bot.types.Incoming`, answers through
:class:`SlackReplySink` (a placeholder with the queue position, then
``chat.update`` about once a second, continued in new thread messages past
Slack's limit), and maps the ``/xwin`` slash command onto ``Bot.command``.

Usage (``bot.main``)::

    slack = SlackAdapter(bot, config.slack, Secrets.from_env())
    await slack.start()      # AdapterError with one sentence on a bad token/scope
    ...
    await slack.close()
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_format import (
    mentioned_channels,
    mentioned_users,
    readable_text,
    split_message,
    to_mrkdwn,
)
from bot.actions import ActionSink, Vote
from bot.config import Config, Secrets, SlackConfig
from bot.errors import AdapterError
from bot.types import (
    CommandContext,
    CommandReply,
    ConversationKey,
    Incoming,
    ReplyAction,
    ReplyInfo,
    ReplySink,
    SinkFactory,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: Characters per Slack message. Slack truncates ``text`` past 40,000 and
#: advises 4,000; staying under it keeps each message readable and editable.
MESSAGE_LIMIT = 3500
#: Scopes the bot cannot work without, and the ones that only degrade it.
REQUIRED_SCOPES = ("app_mentions:read", "chat:write")
DM_SCOPE = "im:history"
OPTIONAL_SCOPES = ("channels:history", "users:read")
#: Message subtypes that are someone writing to the bot.
_USER_SUBTYPES = frozenset({"", "file_share", "thread_broadcast"})
_SEEN_EVENTS = 2048
_CONNECT_TIMEOUT = 30.0
_EVENTS_PATH = "/slack/events"
_SORRY = "Sorry, something went wrong on my side; please try again."


class SlackBot(Protocol):
    """The part of ``bot.app.Bot`` this adapter uses (see docs/architecture.md)."""

    @property
    def config(self) -> Config: ...

    def register_platform(self, platform: Literal["slack"], sink_factory: SinkFactory) -> None: ...

    async def handle(self, incoming: Incoming, sink: ReplySink) -> object: ...

    async def command(self, ctx: CommandContext, text: str) -> CommandReply: ...

    async def cancel_message(self, key: ConversationKey, platform_message_id: str) -> bool: ...

    async def knows_conversation(self, key: ConversationKey) -> bool: ...

    async def continue_reply(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply: ...

    async def regenerate(self, action: ReplyAction, make_sink: ActionSink) -> CommandReply: ...

    async def feedback(self, action: ReplyAction, vote: Vote) -> CommandReply: ...


# ---------------------------------------------------------------- buttons (issue 11)

#: Block action ids; each button's ``value`` carries the reply's row id, so a
#: click is understood with nothing in memory (after a restart too).
CONTINUE_ACTION = "xwin_continue"
REGENERATE_ACTION = "xwin_regenerate"
FEEDBACK_ACTION = "xwin_feedback"
#: Characters of text in one section block (Slack's limit is 3000).
SECTION_LIMIT = 3000


def final_blocks(text: str, info: ReplyInfo, *, native_feedback: bool = True) -> list[JSON]:
    """The blocks of a finished reply's last message: its mrkdwn ``text``, then
    Continue (only when cut at max_new_tokens) and Regenerate, then 👍/👎 as
    Slack's ``feedback_buttons`` (or plain buttons where those are refused)."""
    sections = [text[i : i + SECTION_LIMIT] for i in range(0, len(text), SECTION_LIMIT)] or [" "]
    blocks: list[JSON] = [{"type": "section", "text": {"type": "mrkdwn", "text": t}} for t in sections]
    rid = str(info.reply_id)
    buttons = [_button("Regenerate", REGENERATE_ACTION, rid)]
    if info.can_continue:
        buttons.insert(0, {**_button("Continue", CONTINUE_ACTION, rid), "style": "primary"})
    if native_feedback:
        blocks.append({"type": "actions", "elements": buttons})
        blocks.append({"type": "context_actions", "elements": [{
            "type": "feedback_buttons", "action_id": FEEDBACK_ACTION,
            "positive_button": {"text": _plain("👍"), "value": f"up:{rid}",
                                "accessibility_label": "Mark this reply as good"},
            "negative_button": {"text": _plain("👎"), "value": f"down:{rid}",
                                "accessibility_label": "Mark this reply as bad"},
        }]})
    else:
        votes = [{**_button("👍", FEEDBACK_ACTION, f"up:{rid}"), "action_id": f"{FEEDBACK_ACTION}_up"},
                 {**_button("👎", FEEDBACK_ACTION, f"down:{rid}"), "action_id": f"{FEEDBACK_ACTION}_down"}]
        blocks.append({"type": "actions", "elements": buttons + votes})
    return blocks


@dataclass
class BlockSupport:
    """What this workspace's Slack takes, shared by an adapter's sinks:
    ``feedback_buttons`` until Slack refuses them once (then plain buttons)."""

    native_feedback: bool = True


def _plain(text: str) -> JSON:
    return {"type": "plain_text", "text": text, "emoji": True}


def _button(label: str, action_id: str, value: str) -> JSON:
    return {"type": "button", "text": _plain(label), "action_id": action_id, "value": value}


# ---------------------------------------------------------------- replies


class SlackReplySink:
    """One reply in one Slack thread (or DM): a placeholder, then throttled
    ``chat.update`` edits, continued in new messages past ``limit``."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str,
        *,
        update_interval: float,
        limit: int = MESSAGE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        resume_ts: str = "",
        skip: int = 0,
        support: BlockSupport | None = None,
    ) -> None:
        """``resume_ts``: a message of the reply to go on editing (Continue),
        which shows the reply's text from its ``skip``-th message on."""
        self.update_interval = update_interval
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._limit = limit
        self._clock = clock
        self._ts: list[str] = [resume_ts] if resume_ts else []
        self._shown: list[str] = [""] if resume_ts else []
        self._skip = skip
        self._clear_blocks = bool(resume_ts)  # its old buttons go with the first edit
        self._info: ReplyInfo | None = None
        self._support = support or BlockSupport()
        self._last_edit = float("-inf")
        self._streamed = bool(resume_ts)
        self._lock = asyncio.Lock()

    async def queued(self, position: int) -> None:
        status = "_Thinking…_" if position <= 0 else f"_Queued: {position} ahead of you…_"
        await self._status(status)

    async def started(self) -> None:
        await self._status("_Thinking…_")

    async def update(self, text_so_far: str) -> None:
        if not text_so_far.strip() or self._clock() - self._last_edit < self.update_interval / 2:
            return
        self._streamed = True
        await self._sync(split_message(to_mrkdwn(text_so_far), self._limit)[self._skip :])

    async def reply_stored(self, info: ReplyInfo) -> None:
        self._info = info

    async def finish(self, text: str) -> None:
        chunks = split_message(to_mrkdwn(text), self._limit)[self._skip :] if text.strip() else []
        await self._sync(chunks or ["_(no reply)_"], buttons=self._info)

    async def fail(self, user_message: str) -> None:
        text = to_mrkdwn(user_message)
        if self._streamed:
            await self._post(text)  # keep the partial answer, say why it stopped
        else:
            await self._status(text)

    async def _status(self, text: str) -> None:
        """Show a one-line status in the placeholder (posted on first use)."""
        if self._streamed:
            return
        await self._sync([text])

    async def _sync(self, chunks: list[str], *, buttons: ReplyInfo | None = None) -> None:
        """Show ``chunks``; ``buttons`` go under the last one (the final message)."""
        async with self._lock:
            for i, chunk in enumerate(chunks):
                last = buttons if i == len(chunks) - 1 else None
                if i >= len(self._ts):
                    await self._post(chunk)
                    if last is not None and i < len(self._ts):
                        await self._edit(i, chunk, buttons=last)
                elif self._shown[i] != chunk or last is not None:
                    await self._edit(i, chunk, buttons=last)
            self._last_edit = self._clock()

    async def _post(self, text: str) -> None:
        try:
            resp = await self._client.chat_postMessage(
                channel=self._channel,
                thread_ts=self._thread_ts or None,
                text=text,
                unfurl_links=False,
                unfurl_media=False,
                link_names=False,  # "@here" typed by the model stays text
            )
        except SlackApiError as exc:
            log.warning("slack: chat.postMessage in %s failed: %s", self._channel, _error_of(exc))
            return
        self._ts.append(str(resp["ts"]))
        self._shown.append(text)

    async def _edit(self, index: int, text: str, *, buttons: ReplyInfo | None = None) -> None:
        blocks: list[JSON] | None = None
        if buttons is not None:
            blocks = final_blocks(text, buttons, native_feedback=self._support.native_feedback)
        elif index == 0 and self._clear_blocks:
            self._clear_blocks, blocks = False, []
        try:
            await self._client.chat_update(
                channel=self._channel, ts=self._ts[index], text=text, link_names=False, blocks=blocks
            )
        except SlackApiError as exc:
            if buttons is not None and self._support.native_feedback and _error_of(exc) == "invalid_blocks":
                log.warning("slack: feedback_buttons refused (invalid_blocks); using plain buttons from now on")
                self._support.native_feedback = False
                await self._edit(index, text, buttons=buttons)
                return
            log.warning("slack: chat.update in %s failed: %s", self._channel, _error_of(exc))
            return
        self._shown[index] = text


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class _Identity:
    """Who the bot is, from ``auth.test``."""

    team_id: str
    user_id: str
    bot_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class _Message:
    """The fields of a Slack message event the adapter uses."""

    team: str
    channel: str
    user: str
    ts: str
    thread_ts: str
    text: str
    is_dm: bool
    subtype: str
    from_bot: bool

    @classmethod
    def of(cls, event: Mapping[str, Any], body: Mapping[str, Any]) -> _Message:
        return cls(
            # The workspace the app is installed in (event.team is the author's,
            # another one in Slack Connect channels).
            team=str(body.get("team_id") or event.get("team") or ""),
            channel=str(event.get("channel", "")),
            user=str(event.get("user") or ""),
            ts=str(event.get("ts", "")),
            thread_ts=str(event.get("thread_ts") or ""),
            text=str(event.get("text") or ""),
            is_dm=event.get("channel_type") == "im" or str(event.get("channel", "")).startswith("D"),
            subtype=str(event.get("subtype") or ""),
            from_bot=bool(event.get("bot_id")) or event.get("subtype") == "bot_message",
        )


# ---------------------------------------------------------------- adapter


class SlackAdapter:
    """Slack in front of the core: ``await start()``, then ``await close()``."""

    def __init__(
        self,
        bot: SlackBot,
        config: SlackConfig,
        secrets: Secrets,
    ) -> None:
        self._bot = bot
        self._config = config
        self._bot_token = secrets.slack_bot_token
        self._app_token = secrets.slack_app_token
        self._signing_secret = secrets.slack_signing_secret
        self._update_interval = bot.config.bot.stream_interval
        self._client = AsyncWebClient(token=self._bot_token or None, base_url=config.api_base_url)
        self._client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
        self._app: AsyncApp | None = None
        self._identity = _Identity("", "", "", frozenset())
        self._names: dict[str, str] = {}
        self._channel_names: dict[str, str] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._blocks = BlockSupport()
        bot.register_platform("slack", self.sink_for)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Check the tokens and scopes, then connect (Socket Mode) or listen (HTTP).

        Raises :class:`AdapterError` with one sentence saying what to fix.
        """
        self._check_secrets()
        self._identity = await self._auth_test()
        self._check_scopes(self._identity.scopes)
        app = self._app = self._build_app()
        if self._config.mode == "socket":
            await self._start_socket(app)
        else:
            await self._start_http(app)
        log.info("slack: connected as %s in team %s (%s mode)", self._identity.user_id,
                 self._identity.team_id, self._config.mode)

    async def close(self) -> None:
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

    @property
    def http_port(self) -> int:
        """The port HTTP mode listens on (useful when configured as 0)."""
        return self._port

    def sink_for(self, key: ConversationKey, reply_ref: dict[str, str]) -> ReplySink:
        """Sink factory for jobs resumed after a restart."""
        channel = reply_ref.get("channel") or key.channel
        thread_ts = reply_ref.get("thread_ts", key.thread)
        return self._sink(channel, thread_ts, reply_ref.get("edit_ts", ""), int(reply_ref.get("skip") or 0))

    def _sink(self, channel: str, thread_ts: str, resume_ts: str = "", skip: int = 0) -> SlackReplySink:
        return SlackReplySink(self._client, channel, thread_ts, update_interval=self._update_interval,
                              resume_ts=resume_ts, skip=skip, support=self._blocks)

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
        handler = AsyncSocketModeHandler(app, app_token=self._app_token, logger=log)
        handler.client.wss_uri = str(resp["url"])
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
        async def dispatch(request: web.Request) -> web.Response:
            return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

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
        try:
            reply = await self._run_command(command)
        except Exception:
            log.exception("slack: /xwin %r failed", command.get("text", ""))
            reply = CommandReply(_SORRY, ok=False)
        response_type = "ephemeral" if reply.ephemeral else "in_channel"
        try:
            await respond(text=to_mrkdwn(reply.text), response_type=response_type, replace_original=False)
        except (SlackClientError, OSError) as exc:
            log.warning("slack: could not answer /xwin through its response_url: %s", exc)

    async def _on_button(self, ack: AsyncAck, body: JSON, action: JSON, respond: AsyncRespond) -> None:
        """A button under a reply: acked at once (Slack wants it within 3 s),
        then the core decides; the presser gets one ephemeral line."""
        await ack()
        try:
            text = await self._press(body, action)
        except Exception:
            log.exception("slack: button %s failed", action.get("action_id"))
            text = _SORRY
        try:
            await respond(text=to_mrkdwn(text), response_type="ephemeral", replace_original=False)
        except (SlackClientError, OSError) as exc:
            log.warning("slack: could not answer a button through its response_url: %s", exc)

    async def _press(self, body: Mapping[str, Any], action: Mapping[str, Any]) -> str:
        what, _, number = str(action.get("value") or "").rpartition(":")
        what = what or ("continue" if action.get("action_id") == CONTINUE_ACTION else "regenerate")
        team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
        channel = str((body.get("channel") or {}).get("id") or "")
        user = str((body.get("user") or {}).get("id") or "")
        message = body.get("message") or {}
        is_dm = channel.startswith("D")
        if not number.isdigit() or not self._allowed(team, channel, is_dm):
            return "I'm not enabled here."
        thread = str(message.get("thread_ts") or "")
        key = _dm_key(channel) if is_dm else ConversationKey("slack", team, channel, thread)
        press = ReplyAction(key, int(number), user, is_admin=user in self._config.admin_users)
        if what in ("up", "down"):
            return (await self._bot.feedback(press, "up" if what == "up" else "down")).text
        pressed_ts = str(message.get("ts") or "")

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            ref = {"channel": channel, "thread_ts": thread}
            if what != "continue":
                return self._sink(channel, thread), ref
            skip = max(0, len(split_message(to_mrkdwn(shown), MESSAGE_LIMIT)) - 1)
            ref.update(edit_ts=pressed_ts, skip=str(skip))
            return self._sink(channel, thread, pressed_ts, skip), ref

        run = self._bot.continue_reply if what == "continue" else self._bot.regenerate
        return (await run(press, make_sink)).text

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
        return not self._allowed(msg.team, msg.channel, msg.is_dm)

    def _allowed(self, team: str, channel: str, is_dm: bool) -> bool:
        cfg = self._config
        if cfg.teams and team not in cfg.teams:
            return False
        if is_dm:
            return cfg.allow_dms
        return not cfg.channels or channel in cfg.channels

    def _mentions_me(self, text: str) -> bool:
        return bool(self._identity.user_id) and f"<@{self._identity.user_id}" in text

    async def _guarded(self, msg: _Message, handler: Callable[[_Message], Any]) -> None:
        """The error boundary of one event: log it, tell the user one sentence."""
        try:
            await handler(msg)
        except Exception:
            log.exception("slack: message %s in %s failed", msg.ts, msg.channel)
            await self._sink(msg.channel, msg.thread_ts or ("" if msg.is_dm else msg.ts)).fail(_SORRY)

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
        previous = event.get("previous_message") or {}
        ts = str(previous.get("ts") or event.get("deleted_ts") or "")
        if not ts or not self._allowed(msg.team, msg.channel, msg.is_dm):
            return
        thread = str(previous.get("thread_ts") or ts)
        key = _dm_key(msg.channel) if msg.is_dm else ConversationKey("slack", msg.team, msg.channel, thread)
        if await self._bot.cancel_message(key, ts):
            log.info("slack: message %s deleted; its reply was cancelled", ts)

    async def _handle(self, msg: _Message, key: ConversationKey, reply_thread: str) -> None:
        incoming = Incoming(
            key=key,
            message_id=msg.ts,
            author_id=msg.user,
            author_name=await self._user_name(msg.user),
            text=await self._readable(msg.text),
            is_dm=msg.is_dm,
            created_at=_ts_seconds(msg.ts),
            reply_ref={"channel": msg.channel, "thread_ts": reply_thread},
        )
        result = await self._bot.handle(incoming, self._sink(msg.channel, reply_thread))
        log.debug("slack: message %s in %s: %s", msg.ts, msg.channel, result)

    # ------------------------------------------------------------ commands

    async def _run_command(self, command: Mapping[str, Any]) -> CommandReply:
        team = str(command.get("team_id", ""))
        channel = str(command.get("channel_id", ""))
        user = str(command.get("user_id", ""))
        is_dm = channel.startswith("D") or command.get("channel_name") == "directmessage"
        if not self._allowed(team, channel, is_dm):
            return CommandReply("I'm not enabled here.", ok=False)
        key = _dm_key(channel) if is_dm else ConversationKey("slack", team, channel, "")
        ctx = CommandContext(key=key, author_id=user, is_dm=is_dm, is_admin=user in self._config.admin_users)
        return await self._bot.command(ctx, str(command.get("text", "")).strip())

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
}


def _error_of(exc: SlackApiError) -> str:
    """Slack's error code, or the HTTP status when the answer was not JSON."""
    data = exc.response.data
    if isinstance(data, dict):
        return str(data.get("error", "unknown error"))
    return f"HTTP {exc.response.status_code}"


def _dm_key(channel: str) -> ConversationKey:
    return ConversationKey("slack", "dm", channel, "")


def _ts_seconds(ts: str) -> float:
    try:
        return float(ts)
    except ValueError:
        return time.time()


def _bound_port(site: web.TCPSite, configured: int) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else configured

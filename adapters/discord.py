"""The Discord adapter: discord.py events in, :class:`~bot.types.Incoming` out, replies back.

- A mention in a text channel starts a conversation in a new thread made from the
  message (``reply_in = "thread"``) or as a reply in place (``"reply"``: the
  channel's running conversation). Messages in a bot thread continue it (with the
  message content intent; without it, when they mention the bot). Every DM
  continues the author's DM conversation.
- ``/xwin settings|set|reset|forget|delete|stop|status`` through ``app_commands``; the
  option ranges and choices come from :data:`bot.settings.SPECS`. Replies are
  ephemeral, and the interaction is deferred first.
- Replies stream into one message edited about once a second, continue in new
  messages past 2000 characters without cutting a code block open, and are sent
  with ``AllowedMentions.none()``: model text can never ping anyone.

``api_base_url`` and ``gateway_url`` are honoured by pointing discord.py's two
process-wide endpoints (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``) at
them while the adapter runs: one Discord adapter per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands

from adapters.files import Downloader
from bot.config import DiscordConfig
from bot.errors import AdapterError
from bot.settings import SPECS, SYSTEM_PROMPT_MAX
from bot.types import (
    CommandContext,
    CommandReply,
    ConversationKey,
    Incoming,
    RemoteFile,
    ReplyAction,
    ReplyInfo,
    ReplySink,
)

if TYPE_CHECKING:
    from bot.app import Bot

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
THREAD_NAME_LIMIT = 100
TYPING_EVERY = 8.0
NO_MENTIONS = discord.AllowedMentions.none()
PLATFORM: Final = "discord"
PLACEHOLDER_THINKING = "thinking…"
EMPTY_REPLY = "(the model gave an empty reply)"
HANDLER_FAILED = "Sorry, something went wrong while handling that message."
NOT_HERE = "The bot is not enabled here."
#: Where attachments are downloaded from; nowhere else.
FILE_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")
_REFUSED = "not allowed to post in this channel"


# ---------------------------------------------------------------------------- pure helpers

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")


class _Splitter:
    """Packs lines into chunks of at most ``limit`` characters; a code fence that is
    open at a chunk's end is closed there and reopened at the next chunk's start."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[str] = []
        self.lines: list[str] = []
        self.fence: str | None = None  # the opening line of the open fence
        self.marker = ""  # its backticks or tildes
        self.fresh = True  # ``lines`` holds nothing but a reopened fence

    def length_with(self, line: str, reserve: int) -> int:
        joined = sum(len(x) for x in self.lines) + len(self.lines)  # lines + newlines
        return joined + len(line) + reserve

    def next_fence(self, line: str) -> tuple[str | None, str]:
        match = _FENCE.match(line)
        if match is None:
            return self.fence, self.marker
        if self.fence is None:
            return line.strip(), match.group(1)
        return None, ""

    def add(self, line: str) -> None:
        fence, marker = self.next_fence(line)
        reserve = len(marker) + 1 if fence else 0
        if not self.fresh and self.length_with(line, reserve) > self.limit:
            self.flush()
        while self.length_with(line, reserve) > self.limit:
            line = self.cut(line, reserve)
        self.lines.append(line)
        self.fresh = False
        self.fence, self.marker = fence, marker

    def cut(self, line: str, reserve: int) -> str:
        """Put as much of an over-long line as fits in this chunk; return the rest."""
        room = max(1, self.limit - self.length_with("", reserve))
        at = line.rfind(" ", room // 2, room)
        at = room if at <= 0 else at + 1
        self.lines.append(line[:at])
        self.fresh = False
        self.flush()
        return line[at:]

    def flush(self) -> None:
        if not self.fresh:
            text = "\n".join(self.lines)
            if self.fence is not None:
                text += "\n" + self.marker
            if text.strip():
                self.chunks.append(text)
        self.lines = [self.fence] if self.fence is not None else []
        self.fresh = True


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters, preferring line
    breaks, never leaving a code block open: it is closed at the end of one message
    and reopened (with its language) at the start of the next."""
    splitter = _Splitter(limit)
    for line in text.split("\n"):
        splitter.add(line)
    splitter.flush()
    return splitter.chunks


_USER = re.compile(r"<@!?(\d+)>")
_ROLE = re.compile(r"<@&(\d+)>")
_CHANNEL = re.compile(r"<#(\d+)>")
_EMOJI = re.compile(r"<a?:(\w+):\d+>")
_TIMESTAMP = re.compile(r"<t:(-?\d+)(?::[tTdDfFR])?>")
_SPACES = re.compile(r"[ \t]{2,}")


def readable_text(
    content: str,
    *,
    bot_id: int,
    users: Mapping[int, str],
    roles: Mapping[int, str],
    channels: Mapping[int, str],
) -> str:
    """Discord markup to plain text: the bot's own mention removed, other mentions
    as ``@name`` / ``@role`` / ``#channel``, custom emoji as ``:name:``, timestamps
    as UTC dates."""
    text = re.sub(rf"<@!?{bot_id}>", " ", content)
    text = _USER.sub(lambda m: "@" + users.get(int(m.group(1)), "unknown-user"), text)
    text = _ROLE.sub(lambda m: "@" + roles.get(int(m.group(1)), "unknown-role"), text)
    text = _CHANNEL.sub(lambda m: "#" + channels.get(int(m.group(1)), "unknown-channel"), text)
    text = _EMOJI.sub(lambda m: f":{m.group(1)}:", text)
    text = _TIMESTAMP.sub(lambda m: _utc(int(m.group(1))), text)
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().split("\n"))


def _utc(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def thread_name(text: str) -> str:
    """A thread title from the first line of the question."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return "Xwin chat"
    return first if len(first) <= THREAD_NAME_LIMIT else first[: THREAD_NAME_LIMIT - 1] + "…"


def queued_text(position: int) -> str:
    return "queued: next in line" if position <= 0 else f"queued: {position} ahead"


# Buttons under a finished reply (issue 11). The custom id carries the reply's row
# id, so a click is understood with nothing in memory (after a restart too).
BUTTON_PREFIX = "xwin"
BUTTON_ACTIONS = ("continue", "regenerate", "up", "down")


def button_id(action: str, reply_id: int) -> str:
    return f"{BUTTON_PREFIX}:{action}:{reply_id}"


def parse_button_id(custom_id: str) -> tuple[str, int] | None:
    prefix, _, rest = custom_id.partition(":")
    action, _, number = rest.partition(":")
    if prefix != BUTTON_PREFIX or action not in BUTTON_ACTIONS or not number.isdigit():
        return None
    return action, int(number)


def reply_buttons(info: ReplyInfo) -> discord.ui.View:
    """Continue (only when cut at max_new_tokens), Regenerate, 👍, 👎."""
    view = discord.ui.View(timeout=None)
    if info.can_continue:
        view.add_item(discord.ui.Button(label="Continue", style=discord.ButtonStyle.primary,
                                        custom_id=button_id("continue", info.reply_id)))
    view.add_item(discord.ui.Button(label="Regenerate", style=discord.ButtonStyle.secondary,
                                    custom_id=button_id("regenerate", info.reply_id)))
    view.add_item(discord.ui.Button(emoji="👍", custom_id=button_id("up", info.reply_id)))
    view.add_item(discord.ui.Button(emoji="👎", custom_id=button_id("down", info.reply_id)))
    view.stop()  # not kept in discord.py's view store: clicks are read from the custom id
    return view


# ---------------------------------------------------------------------------- the reply sink


class DiscordSink:
    """One reply: a placeholder that shows the queue position, then the text streamed
    by editing it, continued in new messages past the length limit."""

    #: Seconds between tries of the final edit (discord.py has already waited
    #: out each 429 up to five times by then); after the last, a new message.
    final_retry_delays: tuple[float, ...] = (1.0, 4.0)

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        update_interval: float,
        reference: discord.MessageReference | None = None,
        ready: Callable[[], Awaitable[None]] | None = None,
        limit: int = MESSAGE_LIMIT,
        resume: Sequence[discord.PartialMessage] = (),
        skip: int = 0,
        continuing: bool = False,
    ) -> None:
        """``resume``: a message of the reply to go on editing (Continue), which
        shows the reply's text from its ``skip``-th message on."""
        self.update_interval = update_interval
        self._channel = channel
        self._reference = reference
        self._ready = ready
        self._limit = limit
        # A job resumed after a restart shows its reply in the messages it had (issue 9);
        # a Continue goes on editing the reply's last message, which shows its text from
        # the ``skip``-th message on, and takes its old buttons off with the first edit.
        self._messages: list[discord.Message | discord.PartialMessage] = list(resume)
        self._shown: list[str] = [""] * len(self._messages)
        self._skip = skip
        self._clear_view = continuing
        self._info: ReplyInfo | None = None
        #: Set by the core: told the ids of the messages that show this reply.
        self.on_placed: Callable[[list[str]], Awaitable[None]] | None = None
        self._has_text = continuing
        self._started = continuing
        self._forbidden = False
        self._lock = asyncio.Lock()
        self._typing: asyncio.Task[None] | None = None
        self._latest: list[str] | None = None  # newest streamed text not yet shown
        self._flusher: asyncio.Task[None] | None = None

    async def queued(self, position: int) -> None:
        # The worker may start a job before ``Bot.handle`` reports its position.
        await self._show([queued_text(position)], placeholder=True)

    async def started(self) -> None:
        self._started = True
        if not self._has_text:
            await self._show([PLACEHOLDER_THINKING])
        if self._typing is None:
            self._typing = asyncio.create_task(self._keep_typing())

    async def update(self, text_so_far: str) -> None:
        """Returns at once: the edit happens in the background, so a slow or
        rate-limited Discord never holds up generation; only the newest text is sent."""
        if not text_so_far.strip():
            return
        self._has_text = True
        self._latest = split_message(text_so_far, self._limit)[self._skip :]
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def reply_stored(self, info: ReplyInfo) -> None:
        self._info = info

    async def finish(self, text: str) -> None:
        """The final text must arrive (issue 9): edits are retried with backoff,
        then the text is posted as new messages (the old ones removed). Raises
        :class:`AdapterError` when it could not be shown at all."""
        await self._settle()
        self._has_text = True
        chunks = split_message(text, self._limit)[self._skip :] or [EMPTY_REPLY]
        await self._deliver(chunks)
        if self._info is not None:
            await self._show([], buttons=reply_buttons(self._info))

    async def _deliver(self, chunks: list[str]) -> None:
        for delay in (*self.final_retry_delays, None):
            if await self._final(chunks):
                return
            if delay is not None:
                await asyncio.sleep(delay)
        await self._repost(chunks)

    async def fail(self, user_message: str) -> None:
        await self._settle()
        if self._has_text:
            await self._show([*self._shown, user_message])
        else:
            await self._show([user_message])

    async def _final(self, chunks: list[str]) -> bool:
        async with self._lock:
            if self._forbidden:
                raise AdapterError(_REFUSED)
            try:
                await self._put(chunks)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                log.warning("Discord: the final reply did not go through (%s); trying again", _why(exc))
                return False
        return True

    async def _repost(self, chunks: list[str]) -> None:
        """Edits keep failing: post the reply as new messages, then drop the old ones."""
        async with self._lock:
            (old, old_shown), self._messages, self._shown = (self._messages, self._shown), [], []
            try:
                await self._apply(chunks)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                self._messages, self._shown = old, old_shown
                raise AdapterError(f"Discord: the final reply could not be posted ({_why(exc)})") from None
        for message in old:
            with contextlib.suppress(discord.HTTPException, aiohttp.ClientError, OSError):
                await message.delete()
        log.info("Discord: the final reply was posted as a new message after its edits failed")

    async def _flush(self) -> None:
        while self._latest is not None:
            chunks, self._latest = self._latest, None
            await self._show(chunks)

    async def _settle(self) -> None:
        """Stop typing and drop pending edits: the final text comes next."""
        await self._stop_typing()
        self._latest = None
        if self._flusher is not None:
            await self._flusher
            self._flusher = None

    async def _show(
        self, chunks: list[str], *, placeholder: bool = False, buttons: discord.ui.View | None = None
    ) -> None:
        async with self._lock:
            if (placeholder and self._started) or self._forbidden:
                return
            try:
                if buttons is None:
                    await self._put(chunks)
                elif self._messages:
                    self._messages[-1] = await self._messages[-1].edit(view=buttons)
            except discord.HTTPException as exc:
                log.warning("Discord: could not update a reply: %s %s", exc.status, exc.text)
            except AdapterError as exc:
                if not self._forbidden:  # that one was said once already
                    log.warning("Discord: reply not sent: %s", exc)
            except Exception:
                # The sink is an error boundary: a failed edit must not end the job.
                log.exception("Discord: could not update a reply")

    async def _put(self, chunks: list[str]) -> None:
        """Show ``chunks`` (under the lock); a refusal becomes an AdapterError."""
        if self._ready is not None:
            await self._ready()
        try:
            await self._apply(chunks)
        except discord.Forbidden as exc:
            self._refused(exc)
            raise AdapterError(_REFUSED) from None

    def _refused(self, exc: discord.Forbidden) -> None:
        self._forbidden = True  # one clear line, not one per streamed edit
        log.warning(
            "Discord: not allowed to post in channel %s (%s): give the bot the Send Messages "
            "and Send Messages in Threads permissions there",
            getattr(self._channel, "id", "?"),
            exc.text,
        )

    async def _apply(self, chunks: list[str]) -> None:
        placed = self._ids()
        try:
            for i, chunk in enumerate(chunks):
                if i < len(self._messages):
                    if self._shown[i] != chunk:
                        await self._edit(i, chunk)
                else:
                    self._messages.append(await self._send(chunk))
                    self._shown.append(chunk)
            while len(self._messages) > len(chunks):
                self._shown.pop()
                with contextlib.suppress(discord.NotFound):
                    await self._messages.pop().delete()
        finally:
            if self._ids() != placed:
                await self._placed()

    async def _edit(self, i: int, chunk: str) -> None:
        message = self._messages[i]
        try:
            if i == 0 and self._clear_view:  # a continued reply's old buttons go with its first edit
                self._messages[i] = await message.edit(content=chunk, allowed_mentions=NO_MENTIONS, view=None)
                self._clear_view = False
            else:
                self._messages[i] = await message.edit(content=chunk, allowed_mentions=NO_MENTIONS)
        except discord.NotFound:  # deleted meanwhile (or before a restart): post it again
            self._messages[i] = await self._send(chunk)
        self._shown[i] = chunk

    def _ids(self) -> list[str]:
        return [str(m.id) for m in self._messages] if self.on_placed is not None else []

    async def _placed(self) -> None:
        if self.on_placed is None:
            return
        try:
            await self.on_placed(self._ids())
        except Exception:
            log.exception("Discord: could not store where a reply is shown")

    async def _send(self, chunk: str) -> discord.Message:
        reference = self._reference if not self._messages else None
        if reference is None:
            return await self._channel.send(chunk, allowed_mentions=NO_MENTIONS)
        return await self._channel.send(chunk, allowed_mentions=NO_MENTIONS, reference=reference)

    async def _keep_typing(self) -> None:
        try:
            while True:
                await self._channel.typing()
                await asyncio.sleep(TYPING_EVERY)
        except discord.HTTPException as exc:
            log.debug("typing indicator failed: %s", exc)

    async def _stop_typing(self) -> None:
        task, self._typing = self._typing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---------------------------------------------------------------------------- slash commands


@dataclass(frozen=True)
class _Place:
    """Where an event happened, reduced to what the allowlists and keys need."""

    guild_id: int | None
    channel_id: int
    parent_id: int | None  # set when the channel is a thread


# Option bounds for the command schema (names in annotations, which discord.py
# evaluates in this module's namespace). top_p's lower bound is open: the core
# rejects 0; max_new_tokens' upper bound depends on the model's context and is
# checked by the core.
_TEMPERATURE_MIN, _TEMPERATURE_MAX = SPECS["temperature"].low, SPECS["temperature"].high
_TOP_P_MIN, _TOP_P_MAX = SPECS["top_p"].low, SPECS["top_p"].high
_TOP_K_MIN = SPECS["top_k"].low
_PENALTY_MIN, _PENALTY_MAX = SPECS["repetition_penalty"].low, SPECS["repetition_penalty"].high
_MAX_NEW_TOKENS_MIN = SPECS["max_new_tokens"].low


class XwinCommands(app_commands.Group):
    """``/xwin ...``: each subcommand is turned into the text after "/xwin" for
    :meth:`bot.app.Bot.command`."""

    def __init__(
        self,
        run: Callable[[discord.Interaction, str], Awaitable[None]],
        set_values: Callable[[discord.Interaction, dict[str, object]], Awaitable[None]],
    ) -> None:
        super().__init__(name="xwin", description="Talk to the Xwin-LM bot: settings and conversation")
        self._run = run
        self._set_values = set_values

    @app_commands.command(name="settings", description="Show the generation settings in force here")
    async def show_settings(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "settings")

    @app_commands.command(name="set", description="Change generation settings here (admins in a server)")
    @app_commands.describe(**{name: spec.help for name, spec in SPECS.items()})
    async def set_(
        self,
        interaction: discord.Interaction,
        temperature: app_commands.Range[float, _TEMPERATURE_MIN, _TEMPERATURE_MAX] | None = None,
        top_p: app_commands.Range[float, _TOP_P_MIN, _TOP_P_MAX] | None = None,
        top_k: app_commands.Range[int, _TOP_K_MIN] | None = None,
        repetition_penalty: app_commands.Range[float, _PENALTY_MIN, _PENALTY_MAX] | None = None,
        max_new_tokens: app_commands.Range[int, _MAX_NEW_TOKENS_MIN] | None = None,
        system_prompt: app_commands.Range[str, 1, SYSTEM_PROMPT_MAX] | None = None,
    ) -> None:
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "max_new_tokens": max_new_tokens,
            "system_prompt": system_prompt,
        }
        # Passed as values: text options are never read as command text (issue 9).
        # Discord itself checks each option's type and range before we see it.
        await self._set_values(interaction, {k: v for k, v in given.items() if v is not None})

    @app_commands.command(name="reset", description="Put settings back to the defaults")
    @app_commands.describe(name="one setting to reset (all when left out)")
    @app_commands.choices(name=[app_commands.Choice(name=n, value=n) for n in SPECS])
    async def reset(
        self, interaction: discord.Interaction, name: app_commands.Choice[str] | None = None
    ) -> None:
        await self._run(interaction, f"reset {name.value}" if name else "reset")

    @app_commands.command(name="forget", description="Start a new conversation here")
    async def forget(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "forget")

    @app_commands.command(name="delete", description="Erase this conversation's stored messages for good (admins)")
    @app_commands.describe(confirm="true erases; without it, says what would be erased")
    async def delete(self, interaction: discord.Interaction, confirm: bool = False) -> None:
        await self._run(interaction, "delete confirm" if confirm else "delete")

    @app_commands.command(name="stop", description="Cancel the reply being written here")
    async def stop(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "stop")

    @app_commands.command(name="status", description="Model, queue and speed")
    async def status(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "status")


# ---------------------------------------------------------------------------- the client


class _Client(discord.Client):
    """discord.py's client with the events routed to the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.adapter = adapter
        self.tree: app_commands.CommandTree[_Client] = app_commands.CommandTree(self)
        self.tree.add_command(XwinCommands(adapter.run_command, adapter.set_command))
        self.tree.on_error = adapter.on_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        await self.adapter.sync_commands()

    async def on_ready(self) -> None:
        self.adapter.ready.set()

    async def on_connect(self) -> None:
        self.adapter.connection_up(resumed=False)

    async def on_resumed(self) -> None:
        self.adapter.connection_up(resumed=True)

    async def on_disconnect(self) -> None:
        self.adapter.online = False

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.adapter.on_message_delete(payload)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type == discord.InteractionType.component:
            await self.adapter.on_button(interaction)


def _intents(config: DiscordConfig) -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = config.message_content_intent
    return intents


# ---------------------------------------------------------------------------- the adapter


class DiscordAdapter:
    """Runs the bot on Discord. ``await start()`` logs in and returns once the gateway
    is ready (or raises :class:`AdapterError` saying what to fix); ``await close()``."""

    def __init__(
        self,
        bot: Bot,
        config: DiscordConfig,
        token: str,
        *,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
        file_origins: Sequence[str] = FILE_ORIGINS,
    ) -> None:
        self._bot = bot
        # Attachment URLs are signed: no token goes with the download.
        self._files = Downloader("Discord", file_origins, timeout=bot.config.attachments.download_timeout)
        self._config = config
        self._token = token
        self._ready_timeout = ready_timeout
        self.ready = asyncio.Event()  # the gateway's READY came
        self._logged_in = asyncio.Event()  # REST calls work
        self._connection: asyncio.Task[None] | None = None
        self._closed = False
        self.online = False  # the gateway connection is up now
        self._sessions = 0
        self._saved_endpoints: tuple[str, yarl.URL] | None = None
        self.client = _Client(
            self,
            intents=_intents(config),
            allowed_mentions=NO_MENTIONS,
            guild_ready_timeout=guild_ready_timeout,
        )
        bot.register_platform(PLATFORM, self.sink_for)

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        if not self._token.strip():
            raise AdapterError("Discord: DISCORD_TOKEN is not set; put the bot token in the environment")
        self._point_at_servers()
        try:
            await self._login()
            self._connection = asyncio.create_task(self.client.connect(reconnect=True))
            await self._wait_ready(self._connection)
        except BaseException:
            await self.close()
            raise
        log.info("Discord: logged in as %s (%s)", self.client.user, self.client.user and self.client.user.id)

    async def close(self) -> None:
        self._closed = True
        self.ready.clear()
        self._logged_in.clear()
        if not self.client.is_closed():
            await self.client.close()
        task, self._connection = self._connection, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._restore_servers()

    def connection_up(self, *, resumed: bool) -> None:
        """A gateway session began (READY) or resumed: every one after the first is a reconnect."""
        if resumed or self._sessions:
            self._bot.metrics.reconnected(PLATFORM)
        self._sessions += not resumed
        self.online = True

    async def not_ready(self) -> str | None:
        """For /readyz: None while connected to the gateway."""
        if self._closed:
            return "closed"
        if not self.ready.is_set() or not self.online:
            return "not connected to the gateway"
        return None

    async def wait_closed(self) -> None:
        """Wait until the gateway connection ends; raise :class:`AdapterError` if it
        ended because of a problem (a revoked token, a refused intent...)."""
        if self._connection is not None:
            try:
                await self._connection
            except Exception as exc:
                raise _adapter_error(exc, self._config) from None

    async def __aenter__(self) -> DiscordAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _point_at_servers(self) -> None:
        self._saved_endpoints = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self._config.api_base_url.rstrip("/")
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self._config.gateway_url)

    def _restore_servers(self) -> None:
        if self._saved_endpoints is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved_endpoints
            self._saved_endpoints = None

    async def _login(self) -> None:
        try:
            await self.client.login(self._token)
            self._logged_in.set()
        except AdapterError:
            raise
        except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            raise _adapter_error(exc, self._config) from None

    async def _wait_ready(self, connection: asyncio.Task[None]) -> None:
        waiter = asyncio.create_task(self.ready.wait())
        try:
            await asyncio.wait(
                {waiter, connection}, timeout=self._ready_timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            waiter.cancel()
        if connection.done():
            exc = connection.exception()
            raise (
                _adapter_error(exc, self._config)
                if exc
                else AdapterError("Discord: the gateway closed at once")
            )
        if not self.ready.is_set():
            raise AdapterError(
                f"Discord: no READY from the gateway at {self._config.gateway_url} "
                f"within {self._ready_timeout:.0f} s; check [discord] gateway_url and the network"
            )

    async def sync_commands(self) -> None:
        """Register ``/xwin``: in ``command_guilds`` at once, or globally."""
        tree = self.client.tree
        try:
            if not self._config.command_guilds:
                await tree.sync()
                return
            for guild_id in self._config.command_guilds:
                guild = discord.Object(id=int(guild_id))
                tree.copy_global_to(guild=guild)
                await tree.sync(guild=guild)
        except ValueError:
            raise AdapterError(
                f"[discord] command_guilds: guild ids are numbers, got {self._config.command_guilds!r}"
            ) from None
        except discord.Forbidden as exc:
            raise AdapterError(
                f"Discord refused to register the /xwin commands ({exc.status} {exc.text}): invite the bot "
                "with the applications.commands scope, and check [discord] command_guilds"
            ) from None

    # ------------------------------------------------------------------ sinks

    def sink_for(self, key: ConversationKey, reply_ref: dict[str, str]) -> ReplySink:
        """The ``sink_factory``: a sink for a job resumed after a restart."""
        channel_id = int(reply_ref.get("channel_id") or key.thread or key.channel)
        channel = self.client.get_partial_messageable(channel_id)
        if reply_ref.get("edit_message_id"):  # a Continue: go on editing the reply
            resume = channel.get_partial_message(int(reply_ref["edit_message_id"]))
            return self._sink(channel, None, resume=[resume], skip=int(reply_ref.get("skip") or 0), continuing=True)
        reference = None
        if reply_ref.get("reference") and reply_ref.get("message_id"):
            asked = channel.get_partial_message(int(reply_ref["message_id"]))
            reference = asked.to_reference(fail_if_not_exists=False)
        shown = [channel.get_partial_message(int(i)) for i in reply_ref.get("messages", "").split(",") if i]
        return self._sink(channel, reference, resume=shown)

    def _sink(
        self,
        channel: discord.abc.Messageable,
        reference: discord.MessageReference | None,
        *,
        resume: Sequence[discord.PartialMessage] = (),
        skip: int = 0,
        continuing: bool = False,
    ) -> DiscordSink:
        return DiscordSink(
            channel,
            update_interval=self._bot.config.bot.stream_interval,
            reference=reference,
            ready=self._until_ready,
            resume=resume,
            skip=skip,
            continuing=continuing,
        )

    async def _until_ready(self) -> None:
        """Sends need the REST session only (logged in), not the gateway's READY."""
        if self._closed:
            raise AdapterError("the Discord adapter is closed")
        if not self._logged_in.is_set():
            try:
                await asyncio.wait_for(self._logged_in.wait(), timeout=self._ready_timeout)
            except TimeoutError:
                raise AdapterError("Discord is not connected; cannot send the reply") from None

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        if not self._wanted(message):
            return
        try:
            await self._route(message)
        except Exception:
            self._bot.metrics.error("adapter")
            log.exception(
                "Discord: failed to handle message %s in channel %s", message.id, message.channel.id
            )
            await self._apologize(message)

    def _wanted(self, message: discord.Message) -> bool:
        """Drop, before any work, what the bot must not answer."""
        if message.author.bot or message.webhook_id is not None:
            return False
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return False
        guild_id = message.guild.id if message.guild is not None else None
        return self._allowed(_place_of(message.channel, guild_id)) and self._permitted(message.author, guild_id)

    def _permitted(self, user: discord.User | discord.Member, guild_id: int | None) -> bool:
        """Access by user and role: ``blocked_users`` everywhere; ``allowed_roles``
        in servers (a DM has no roles: ``allow_dms`` decides)."""
        if str(user.id) in self._config.blocked_users:
            return False
        return guild_id is None or not self._config.allowed_roles or _has_role(user, self._config.allowed_roles)

    def _allowed(self, place: _Place) -> bool:
        if place.guild_id is None:
            return self._config.allow_dms
        if self._config.guilds and str(place.guild_id) not in self._config.guilds:
            return False
        if not self._config.channels:
            return True
        ids = {str(place.channel_id), str(place.parent_id or "")}  # a thread counts as its channel
        return not ids.isdisjoint(self._config.channels)

    async def _route(self, message: discord.Message) -> None:
        if message.guild is None:
            await self._answer_dm(message)
        elif isinstance(message.channel, discord.Thread):
            await self._answer_in_thread(message, message.channel, message.guild)
        elif self._mentions_me(message):
            await self._start_conversation(message, message.guild)

    def _mentions_me(self, message: discord.Message) -> bool:
        me = self.client.user
        return me is not None and any(user.id == me.id for user in message.mentions)

    async def _answer_dm(self, message: discord.Message) -> None:
        key = ConversationKey(PLATFORM, "dm", str(message.channel.id), "")
        await self._handle(message, key, message.channel, reference=None)

    async def _answer_in_thread(
        self, message: discord.Message, thread: discord.Thread, guild: discord.Guild
    ) -> None:
        key = ConversationKey(PLATFORM, str(guild.id), str(thread.parent_id), str(thread.id))
        if self._mentions_me(message):
            known = await self._bot.knows_conversation(key)
            await self._handle(message, key, thread, reference=None if known else message)
        elif self._config.message_content_intent and await self._bot.knows_conversation(key):
            await self._handle(message, key, thread, reference=None)

    async def _start_conversation(self, message: discord.Message, guild: discord.Guild) -> None:
        channel_key = ConversationKey(PLATFORM, str(guild.id), str(message.channel.id), "")
        text = self._text(message)
        title = text or next((a.filename for a in message.attachments), "")
        if title and self._config.reply_in == "thread":
            thread = await self._open_thread(message, title)
            if thread is not None:
                key = ConversationKey(PLATFORM, str(guild.id), str(message.channel.id), str(thread.id))
                await self._handle(message, key, thread, reference=None, text=text)
                return
        await self._handle(message, channel_key, message.channel, reference=message, text=text)

    async def _open_thread(self, message: discord.Message, text: str) -> discord.Thread | None:
        try:
            return await message.create_thread(name=thread_name(text))
        except discord.HTTPException as exc:
            log.warning(
                "Discord: cannot start a thread in #%s (%s %s); answering in place. Give the bot the "
                'Create Public Threads permission, or set [discord] reply_in = "reply"',
                message.channel,
                exc.status,
                exc.text,
            )
            return None

    async def _handle(
        self,
        message: discord.Message,
        key: ConversationKey,
        channel: discord.abc.Messageable,
        *,
        reference: discord.Message | None,
        text: str | None = None,
    ) -> None:
        ref = reference.to_reference(fail_if_not_exists=False) if reference is not None else None
        incoming = Incoming(
            key=key,
            message_id=str(message.id),
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            text=self._text(message) if text is None else text,
            is_dm=message.guild is None,
            created_at=message.created_at.timestamp(),
            reply_ref=_reply_ref(channel, message, reference is not None),
            files=_files_of(message),
        )
        result = await self._bot.handle(incoming, self._sink(channel, ref), self._files)
        log.debug("Discord: message %s in %s -> %s", message.id, key, result)

    def _text(self, message: discord.Message) -> str:
        me = self.client.user
        return readable_text(
            message.content,
            bot_id=me.id if me is not None else 0,
            users={u.id: u.display_name for u in message.mentions},
            roles={r.id: r.name for r in message.role_mentions},
            channels={c.id: c.name for c in message.channel_mentions},
        )

    async def _apologize(self, message: discord.Message) -> None:
        with contextlib.suppress(discord.HTTPException):
            await message.channel.send(HANDLER_FAILED, allowed_mentions=NO_MENTIONS)

    # ------------------------------------------------------------------ deletions

    async def on_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        place = self._place_of_id(payload.guild_id, payload.channel_id)
        if not self._allowed(place):
            return
        try:
            for key in _keys_for_deleted(place, payload.message_id):
                if await self._bot.cancel_message(key, str(payload.message_id)):
                    log.info("Discord: message %s deleted; its reply was cancelled", payload.message_id)
                    return
        except Exception:
            log.exception("Discord: failed to cancel the reply to deleted message %s", payload.message_id)

    def _place_of_id(self, guild_id: int | None, channel_id: int) -> _Place:
        channel = self.client.get_channel(channel_id)
        parent = channel.parent_id if isinstance(channel, discord.Thread) else None
        return _Place(guild_id, channel_id, parent)

    # ------------------------------------------------------------------ buttons

    async def on_button(self, interaction: discord.Interaction) -> None:
        """A button under a reply: deferred at once (Discord wants an answer
        within 3 s), then the core decides; the presser gets one ephemeral line."""
        data: Mapping[str, Any] = interaction.data or {}
        parsed = parse_button_id(str(data.get("custom_id", "")))
        if parsed is None:
            return  # not one of ours
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await self._answer(interaction, await self._press(interaction, *parsed))
        except Exception:
            log.exception("Discord: button %s failed", data.get("custom_id"))
            with contextlib.suppress(discord.HTTPException):
                await self._answer(interaction, "Sorry, that button failed.")

    async def _press(self, interaction: discord.Interaction, what: str, reply_id: int) -> str:
        context = self._command_context(interaction)
        channel = interaction.channel
        pressed = interaction.message
        if context is None or not isinstance(channel, discord.abc.Messageable) or pressed is None:
            return NOT_HERE
        action = ReplyAction(context.key, reply_id, context.author_id, is_admin=context.is_admin)
        if what in ("up", "down"):
            return (await self._bot.feedback(action, "up" if what == "up" else "down")).text

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            ref = {"channel_id": str(channel.id)}
            if what == "regenerate":
                return self._sink(channel, None), ref
            skip = max(0, len(split_message(shown)) - 1)  # the messages before the pressed one
            resume = self.client.get_partial_messageable(channel.id).get_partial_message(pressed.id)
            ref.update(edit_message_id=str(pressed.id), skip=str(skip))
            return self._sink(channel, None, resume=[resume], skip=skip, continuing=True), ref

        run = self._bot.continue_reply if what == "continue" else self._bot.regenerate
        return (await run(action, make_sink)).text

    # ------------------------------------------------------------------ slash commands

    async def run_command(self, interaction: discord.Interaction, text: str) -> None:
        """Defer, run ``/xwin <text>`` in the core, answer ephemerally."""
        await self._command(interaction, lambda context: self._bot.command(context, text))

    async def set_command(self, interaction: discord.Interaction, values: dict[str, object]) -> None:
        """``/xwin set`` with its typed options, as values."""
        await self._command(interaction, lambda context: self._bot.set_settings(context, values))

    async def _command(
        self, interaction: discord.Interaction, run: Callable[[CommandContext], Awaitable[CommandReply]]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        context = self._command_context(interaction)
        if context is None:
            await self._answer(interaction, NOT_HERE)
            return
        await self._answer(interaction, (await run(context)).text)

    def _command_context(self, interaction: discord.Interaction) -> CommandContext | None:
        place = _place_of(interaction.channel, interaction.guild_id, interaction.channel_id)
        if not self._allowed(place) or not self._permitted(interaction.user, place.guild_id):
            return None
        return CommandContext(
            key=_key_of(place),
            author_id=str(interaction.user.id),
            is_dm=place.guild_id is None,
            is_admin=place.guild_id is None or self._is_admin(interaction.user, interaction.permissions),
        )

    def _is_admin(self, user: discord.User | discord.Member, permissions: discord.Permissions) -> bool:
        if permissions.manage_channels or permissions.administrator:
            return True
        return _has_role(user, self._config.admin_roles)

    async def _answer(self, interaction: discord.Interaction, text: str) -> None:
        first, *rest = split_message(text) or ["Done."]
        await interaction.edit_original_response(content=first, allowed_mentions=NO_MENTIONS)
        for chunk in rest:
            await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_MENTIONS)

    async def on_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        log.error("Discord: /xwin failed", exc_info=error)
        message = "Sorry, that command failed."
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.edit_original_response(content=message, allowed_mentions=NO_MENTIONS)
            else:
                await interaction.response.send_message(message, ephemeral=True, allowed_mentions=NO_MENTIONS)


# ---------------------------------------------------------------------------- small functions


def _has_role(user: discord.User | discord.Member, wanted: tuple[str, ...]) -> bool:
    """Whether a server member has one of the roles named (by id or name)."""
    names = set(wanted)
    return any(str(role.id) in names or role.name in names for role in getattr(user, "roles", []))


def _place_of(channel: object, guild_id: int | None, channel_id: int | None = None) -> _Place:
    cid = getattr(channel, "id", None) or channel_id or 0
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    return _Place(guild_id, int(cid), parent)


def _key_of(place: _Place) -> ConversationKey:
    if place.guild_id is None:
        return ConversationKey(PLATFORM, "dm", str(place.channel_id), "")
    if place.parent_id is not None:
        return ConversationKey(PLATFORM, str(place.guild_id), str(place.parent_id), str(place.channel_id))
    return ConversationKey(PLATFORM, str(place.guild_id), str(place.channel_id), "")


def _keys_for_deleted(place: _Place, message_id: int) -> list[ConversationKey]:
    """Conversations a deleted message may have asked in: the thread made from it,
    the channel's running conversation (reply mode, DMs), the thread it was in."""
    keys = [_key_of(place)]
    if place.guild_id is not None and place.parent_id is None:
        keys.insert(0, ConversationKey(PLATFORM, str(place.guild_id), str(place.channel_id), str(message_id)))
    return keys


def _files_of(message: discord.Message) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(a.filename, a.content_type or "", a.size, a.url) for a in message.attachments
    )


def _reply_ref(channel: discord.abc.Messageable, message: discord.Message, reference: bool) -> dict[str, str]:
    channel_id = getattr(channel, "id", message.channel.id)
    return {
        "channel_id": str(channel_id),
        "message_id": str(message.id),
        "reference": "1" if reference else "",
    }


def _why(exc: BaseException) -> str:
    if isinstance(exc, discord.HTTPException):
        return f"{exc.status} {exc.text}"
    return f"{type(exc).__name__}: {exc}"


def _adapter_error(exc: BaseException, config: DiscordConfig) -> AdapterError:
    """One sentence saying what to fix, for each way logging in can fail."""
    if isinstance(exc, discord.LoginFailure):
        return AdapterError("Discord rejected the bot token (401 Unauthorized): check DISCORD_TOKEN")
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return AdapterError(
            "Discord refused the Message Content intent: enable it for the bot in the Developer Portal "
            "(Bot > Privileged Gateway Intents), or set [discord] message_content_intent = false"
        )
    if isinstance(exc, discord.ConnectionClosed) and exc.code == 4004:
        return AdapterError("Discord rejected the bot token at the gateway (4004): check DISCORD_TOKEN")
    if isinstance(exc, discord.HTTPException):
        return AdapterError(f"Discord answered {exc.status} {exc.text!r} at {config.api_base_url}")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return AdapterError(f"Discord: cannot reach {config.api_base_url}: {exc}")
    return AdapterError(f"Discord: {type(exc).__name__}: {exc}")

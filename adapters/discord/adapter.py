"""The Discord adapter: events in, :class:`~bot.types.Incoming` out, through the event boundary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands

from adapters import strings
from adapters.boundary import EventBoundary
from adapters.discord.client import _Client, _intents
from adapters.discord.sink import NO_MENTIONS, DiscordSink, button_id, parse_button_id
from adapters.discord.text import readable_text, split_message, thread_name
from adapters.files import Downloader
from bot.adapter import Core
from bot.config import DiscordConfig
from bot.errors import AdapterError
from bot.types import (
    ActionSink,
    CommandContext,
    CommandReply,
    ConversationKey,
    Incoming,
    RemoteFile,
    ReplyAction,
    ReplySink,
)

log = logging.getLogger(__package__)  # one logger per platform: "adapters.discord"

PLATFORM: Final = "discord"
#: Where attachments are downloaded from; nowhere else.
FILE_ORIGINS = ("https://cdn.discordapp.com", "https://media.discordapp.net")
#: Messages read back to find the one a reply ends in (``/xwin continue``).
_HISTORY_LIMIT = 50


@dataclass(frozen=True)
class _Place:
    """Where an event happened, reduced to what the allowlists and keys need."""

    guild_id: int | None
    channel_id: int
    parent_id: int | None  # set when the channel is a thread


class DiscordAdapter:
    """Runs the bot on Discord. ``await start()`` logs in and returns once the gateway
    is ready (or raises :class:`AdapterError` saying what to fix); ``await close()``."""

    def __init__(
        self,
        bot: Core,
        config: DiscordConfig,
        token: str,
        *,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
        file_origins: Sequence[str] = FILE_ORIGINS,
    ) -> None:
        self._bot = bot
        self._events = EventBoundary("Discord", log, lambda: bot.metrics.error("adapter"))
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
        """Wait until the gateway connection ends (discord.py reconnects after
        passing faults); raise :class:`AdapterError` if it ended for good without
        :meth:`close` (a revoked token, a refused intent...)."""
        if self._connection is not None:
            try:
                await asyncio.shield(self._connection)
            except asyncio.CancelledError:
                if not self._closed:
                    raise
            except Exception as exc:
                raise _adapter_error(exc, self._config) from None
        if not self._closed:
            raise AdapterError("Discord: the gateway connection closed; stopping")

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

        async def tell(text: str) -> None:
            await message.channel.send(text, allowed_mentions=NO_MENTIONS)

        what = f"message {message.id} in channel {message.channel.id}"
        await self._events.run(self._route(message), what, tell=tell)

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

    # ------------------------------------------------------------------ deletions

    async def on_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        place = self._place_of_id(payload.guild_id, payload.channel_id)
        if self._allowed(place):
            what = f"cancelling the reply to deleted message {payload.message_id}"
            await self._events.run(self._cancel_reply(place, payload.message_id), what)

    async def _cancel_reply(self, place: _Place, message_id: int) -> None:
        for key in _keys_for_deleted(place, message_id):
            if await self._bot.cancel_message(key, str(message_id)):
                log.info("Discord: message %s deleted; its reply was cancelled", message_id)
                return

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
        await self._events.run(self._press_button(interaction, *parsed),
                               f"button {data.get('custom_id')} in channel {interaction.channel_id}",
                               tell=lambda text: _tell_interaction(interaction, text))

    async def _press_button(self, interaction: discord.Interaction, what: str, reply_id: int) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self._answer(interaction, await self._press(interaction, what, reply_id))

    async def _press(self, interaction: discord.Interaction, what: str, reply_id: int) -> str:
        context = self._command_context(interaction)
        channel = interaction.channel
        pressed = interaction.message
        if context is None or not isinstance(channel, discord.abc.Messageable) or pressed is None:
            return strings.NOT_HERE
        action = ReplyAction(context.key, reply_id, context.author_id, is_admin=context.is_admin)
        if what in ("up", "down"):
            return (await self._bot.feedback(action, "up" if what == "up" else "down")).text

        if what == "continue":
            return (await self._bot.continue_reply(action, self._continuing(channel, pressed.id))).text

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            return self._sink(channel, None), {"channel_id": str(channel.id)}

        return (await self._bot.regenerate(action, make_sink)).text

    def _continuing(self, channel: discord.abc.Messageable, last_id: int | None) -> ActionSink:
        """The sink of a Continue: it goes on editing the reply's last message
        ``last_id`` (a new message if that one is gone, or ``None``: not found)."""

        def make_sink(shown: str) -> tuple[ReplySink, dict[str, str]]:
            ref = {"channel_id": str(getattr(channel, "id", ""))}
            skip = max(0, len(split_message(shown)) - 1)  # the reply's messages before its last
            if last_id is None:  # new messages, from the reply's last part on
                return self._sink(channel, None, skip=skip), ref
            resume = self.client.get_partial_messageable(int(ref["channel_id"])).get_partial_message(last_id)
            ref.update(edit_message_id=str(last_id), skip=str(skip))
            return self._sink(channel, None, resume=[resume], skip=skip, continuing=True), ref

        return make_sink

    async def _last_message_of(self, channel: discord.abc.Messageable, reply_id: int) -> int | None:
        """The id of the message that ends reply ``reply_id``: the bot's newest one
        here with that reply's Continue button; None if none is found (or the
        bot may not read the history here)."""
        wanted = button_id("continue", reply_id)
        me = self.client.user
        try:
            async for message in channel.history(limit=_HISTORY_LIMIT):
                if me is not None and message.author.id == me.id and wanted in _custom_ids(message):
                    return message.id
        except discord.HTTPException as exc:
            log.info("Discord: cannot read the history of %s (%s %s); continuing in a new message",
                     getattr(channel, "id", "?"), exc.status, exc.text)
        return None

    # ------------------------------------------------------------------ slash commands

    async def run_command(self, interaction: discord.Interaction, text: str) -> None:
        """Defer, run ``/xwin <text>`` in the core, answer ephemerally."""
        await self._command(interaction, lambda context: self._bot.command(context, text))

    async def continue_command(self, interaction: discord.Interaction) -> None:
        """``/xwin continue``: the newest reply here goes on, editing its last message."""
        await self._command(interaction, lambda context: self._continue_last(interaction, context))

    async def _continue_last(self, interaction: discord.Interaction, context: CommandContext) -> CommandReply:
        channel = interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            return CommandReply(strings.NOT_HERE, ok=False)
        reply_id = await self._bot.last_reply_id(context.key)
        last_id = None if reply_id is None else await self._last_message_of(channel, reply_id)
        make_sink = self._continuing(channel, last_id)
        return await self._bot.continue_last(context.key, context.author_id, context.is_admin, make_sink)

    async def set_command(self, interaction: discord.Interaction, values: dict[str, object]) -> None:
        """``/xwin set`` with its typed options, as values."""
        await self._command(interaction, lambda context: self._bot.set_settings(context, values))

    async def _command(
        self, interaction: discord.Interaction, run: Callable[[CommandContext], Awaitable[CommandReply]]
    ) -> None:
        await self._events.run(self._run_command(interaction, run), _command_name(interaction),
                               tell=lambda text: _tell_interaction(interaction, text))

    async def _run_command(
        self, interaction: discord.Interaction, run: Callable[[CommandContext], Awaitable[CommandReply]]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        context = self._command_context(interaction)
        if context is None:
            await self._answer(interaction, strings.NOT_HERE)
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
        """What discord.py itself raised around a command (a bad option, say)."""
        await self._events.failed(error, _command_name(interaction),
                                  tell=lambda text: _tell_interaction(interaction, text))


# ---------------------------------------------------------------------------- small functions


def _command_name(interaction: discord.Interaction) -> str:
    name = interaction.command.qualified_name if interaction.command is not None else "xwin"
    return f"/{name} in channel {interaction.channel_id}"


async def _tell_interaction(interaction: discord.Interaction, text: str) -> None:
    if interaction.response.is_done():
        await interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


def _custom_ids(message: discord.Message) -> list[str]:
    """The custom ids of the buttons under a message."""
    return [str(getattr(item, "custom_id", "")) for row in message.components
            for item in getattr(row, "children", ())]


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

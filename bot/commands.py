"""`/xwin` commands, once for every platform.

Each adapter maps its own slash command onto :meth:`Commands.run` with the
text after ``/xwin`` (``"set temperature 0.3"``) and a :class:`CommandContext`
saying who asked, where, and whether they may change the channel's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.errors import CommandError
from bot.settings import SPECS, apply_overrides, check_value, describe, parse_value
from bot.store import Store
from bot.types import CommandContext, CommandReply, ConversationKey, Settings

log = logging.getLogger(__name__)

HELP = (
    "Commands: `/xwin settings` · `/xwin set <name> <value>` · `/xwin reset [name]` · "
    "`/xwin continue` · `/xwin forget` · `/xwin delete` · `/xwin stop` · `/xwin status`. "
    f"Settings: {', '.join(SPECS)}."
)

FORGET_INSTEAD = "`/xwin forget` starts a new conversation without deleting anything."
FORGOTTEN = (
    "Forgotten: the next message here starts a new conversation. The earlier messages are not "
    "deleted: the bot's store keeps them (under its retention rules) but no longer uses them in "
    "replies. An admin can erase them for good with `/xwin delete`."
)


def settings_scope(key: ConversationKey, author_id: str, is_dm: bool) -> str:
    """A DM's settings are the user's own; a channel's are shared by its threads."""
    if is_dm:
        return f"user:{key.platform}:{author_id}"
    return f"channel:{key.platform}:{key.workspace}:{key.channel}"


@dataclass
class Commands:
    store: Store
    defaults: Settings
    context_length: int
    #: Cancels the pending jobs here (only this author's when given); returns how many.
    stop: Callable[[ConversationKey, str | None], Awaitable[int]]
    status: Callable[[], Awaitable[str]]

    async def run(self, ctx: CommandContext, text: str) -> CommandReply:
        name, _, rest = text.strip().partition(" ")
        handler = {
            "settings": self._settings, "set": self._set, "reset": self._reset,
            "forget": self._forget, "delete": self._delete, "stop": self._stop, "status": self._status,
        }.get(name.lower())
        if handler is None:
            prefix = f"Unknown command `{name}`. " if name and name.lower() != "help" else ""
            return CommandReply(prefix + HELP, ok=not prefix)
        try:
            return await handler(ctx, rest.strip())
        except CommandError as exc:
            return CommandReply(str(exc), ok=False)

    async def effective(self, scope: str) -> tuple[Settings, set[str]]:
        overrides = await self.store.settings(scope)
        return apply_overrides(self.defaults, overrides), set(overrides)

    def _scope(self, ctx: CommandContext) -> str:
        return settings_scope(ctx.key, ctx.author_id, ctx.is_dm)

    def _require_admin(self, ctx: CommandContext) -> None:
        if not ctx.is_dm and not ctx.is_admin:
            raise CommandError(
                "Only people who manage this channel can change its settings "
                "(`/xwin settings` shows them to everyone)."
            )

    async def _settings(self, ctx: CommandContext, _rest: str) -> CommandReply:
        settings, overridden = await self.effective(self._scope(ctx))
        where = "your DMs" if ctx.is_dm else "this channel"
        return CommandReply(f"Settings in {where}:\n{describe(settings, overridden)}")

    async def _set(self, ctx: CommandContext, rest: str) -> CommandReply:
        name, _, raw = rest.partition(" ")
        if not name or not raw.strip():
            raise CommandError(f"Usage: `/xwin set <name> <value>`; settings: {', '.join(SPECS)}.")
        name = name.lower()
        try:
            value = parse_value(name, raw, context_length=self.context_length)
        except ValueError as exc:
            raise CommandError(f"Not changed: {exc}.") from None
        return CommandReply(await self._store_setting(ctx, name, value))

    async def set_values(self, ctx: CommandContext, values: Mapping[str, Any]) -> CommandReply:
        """``/xwin set`` with typed options (Discord): each value is taken as
        it is, never read as command text, so a newline in a system prompt
        cannot run a second command (issue 9)."""
        if not values:
            return await self.run(ctx, "set")
        lines: list[str] = []
        try:
            for name, raw in values.items():
                value = raw.strip() if isinstance(raw, str) else raw
                try:
                    if name not in SPECS:
                        raise ValueError(f"unknown setting {name!r}; settings are: {', '.join(SPECS)}")
                    check_value(name, value, context_length=self.context_length)
                except ValueError as exc:
                    lines.append(f"{name} not changed: {exc}.")
                    continue
                lines.append(await self._store_setting(ctx, name, value))
        except CommandError as exc:
            return CommandReply(str(exc), ok=False)
        return CommandReply("\n".join(lines), ok=all(" not changed: " not in line for line in lines))

    async def _store_setting(self, ctx: CommandContext, name: str, value: Any) -> str:
        self._require_admin(ctx)
        await self.store.set_setting(self._scope(ctx), name, value, ctx.author_id)
        log.info("%s set %s in %s", ctx.author_id, name, self._scope(ctx))
        shown = repr(value) if isinstance(value, str) else value
        return f"{name} is now {shown}."

    async def _reset(self, ctx: CommandContext, rest: str) -> CommandReply:
        name = rest.lower() or None
        if name is not None and name not in SPECS:
            raise CommandError(f"Unknown setting `{name}`; settings: {', '.join(SPECS)}.")
        self._require_admin(ctx)
        await self.store.reset_settings(self._scope(ctx), name)
        return CommandReply(f"{name} is back to its default." if name else "All settings are back to their defaults.")

    async def _forget(self, ctx: CommandContext, _rest: str) -> CommandReply:
        if not ctx.key.thread:  # a whole channel, not one thread
            self._require_admin(ctx)
        await self.store.forget(ctx.key)
        return CommandReply(FORGOTTEN, ephemeral=False)

    async def _delete(self, ctx: CommandContext, rest: str) -> CommandReply:
        """Erase this conversation's stored messages for good (admins only)."""
        where = "this thread" if ctx.key.thread else "every conversation in this channel"
        if not ctx.is_admin:
            raise CommandError(f"Only admins can delete stored messages. {FORGET_INSTEAD}")
        if rest.lower() != "confirm":
            return CommandReply(
                f"This erases for good what the bot stored of {where}: every message and reply, "
                "and their job records. It cannot be undone. To go ahead: `/xwin delete confirm`."
            )
        deleted = await self.store.delete_conversations(ctx.key)
        if deleted is None:
            raise CommandError("A reply is still being written here: `/xwin stop` it, then delete.")
        log.info("%s deleted %d stored messages of %s", ctx.author_id, deleted, ctx.key)
        return CommandReply(f"Deleted for good: {deleted} stored messages of {where}.", ephemeral=False)

    async def _stop(self, ctx: CommandContext, _rest: str) -> CommandReply:
        own_only = None if (ctx.is_dm or ctx.is_admin) else ctx.author_id
        count = await self.stop(ctx.key, own_only)
        return CommandReply("Stopped." if count else "Nothing is being generated here.")

    async def _status(self, _ctx: CommandContext, _rest: str) -> CommandReply:
        return CommandReply(await self.status())

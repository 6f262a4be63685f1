"""discord.py's client with its events routed to the adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from adapters.discord.commands import XwinCommands
from bot.config import DiscordConfig

if TYPE_CHECKING:
    from adapters.discord.adapter import DiscordAdapter



class _Client(discord.Client):
    """discord.py's client with the events routed to the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.adapter = adapter
        self.tree: app_commands.CommandTree[_Client] = app_commands.CommandTree(self)
        self.tree.add_command(XwinCommands(adapter.run_command, adapter.set_command, adapter.continue_command))
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


